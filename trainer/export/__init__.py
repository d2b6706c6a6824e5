"""Exports: the Hugging Face model directory, and checkpoints as one portable JSON file.

    python -m trainer.export json CHECKPOINT_DIR --out model.json [--weights-only]
    python -m trainer.export import model.json --out CHECKPOINT_DIR
    python -m trainer.export onnx FINAL_MODEL --out model.onnx      # checked in onnxruntime
    python -m trainer.export int8 FINAL_MODEL --out DIR             # dynamic int8, for CPU inference
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.cli import Parser, fail
from trainer.files import as_os_error

if TYPE_CHECKING:   # transformers is imported by the caller; --help stays fast
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

    from trainer.config import TrainConfig

TRAINING_CONFIG_FILE = "training_config.json"
PROG = "python -m trainer.export"


def export_hf(model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerFast", cfg: "TrainConfig",
              out: Path) -> Path:
    """Write config.json, model.safetensors, generation_config.json, tokenizer files and
    training_config.json to ``out``: a GPT2LMHeadModel or LlamaForCausalLM (--arch) that
    AutoModelForCausalLM loads. Its vocabulary is padded past the tokenizer's to a multiple of 64;
    generation_config.json's suppress_tokens lists the padded ids, so generate() never emits them.

    Written beside ``out`` first and renamed into place, so ``out`` is always complete.
    """
    out = Path(out)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / TRAINING_CONFIG_FILE).write_text(json.dumps({"config": cfg.to_dict()}, indent=1, sort_keys=True))
    except BaseException as exc:      # a full disk: nothing half-written is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        disk = as_os_error(exc)
        if disk is not None and disk is not exc:
            raise disk from exc
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def build_parser() -> Parser:
    p = Parser(prog=PROG, description="Convert checkpoints to and from one portable JSON file (tensors as base64 "
                                      "of their raw bytes), and a final_model/ to ONNX or int8.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{json,import,onnx,int8}")
    to_json = sub.add_parser("json", help="Write a checkpoint directory as one JSON file.")
    to_json.add_argument("checkpoint", help="A checkpoint directory, e.g. runs/my-model/checkpoints/step-0001000.")
    to_json.add_argument("--out", required=True, help="The JSON file to write.")
    to_json.add_argument("--weights-only", action="store_true",
                         help="Leave out the optimizer state (a third of the size; a resume restarts AdamW).")
    back = sub.add_parser("import", help="Rebuild a checkpoint directory from a JSON file.")
    back.add_argument("json_file", help="A file written by `json`.")
    back.add_argument("--out", required=True, help="The checkpoint directory to create (must not exist).")
    onnx = sub.add_parser("onnx", help="Write final_model/ as ONNX (opset 18), verified in onnxruntime.")
    onnx.add_argument("model_dir", help="A final_model/ directory written by python -m trainer.")
    onnx.add_argument("--out", required=True, help="The .onnx file to write.")
    int8 = sub.add_parser("int8", help="Quantize final_model/'s Linear layers to int8 (CPU inference).")
    int8.add_argument("model_dir", help="A final_model/ directory written by python -m trainer.")
    int8.add_argument("--out", required=True, help="The directory to create (must not exist); "
                                                    "python -m trainer.generate loads it.")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from trainer.errors import CheckpointError, ConfigError

    problem = _check_paths(args)
    if problem:
        fail(PROG, ConfigError([problem]))
    started = time.perf_counter()
    try:
        out, note = _EXPORTS[args.command](args)
    except CheckpointError as exc:   # nothing was written: every export writes beside --out, then renames
        fail(PROG, CheckpointError(f"{_source(args)}: {exc}"))
    size = sum(f.stat().st_size for f in ([out] if out.is_file() else out.iterdir()))
    print(f"wrote {out} ({size / 1e6:.1f} MB) in {time.perf_counter() - started:.2f} s{note}")
    return 0


def _json(args) -> tuple[Path, str]:
    from trainer.checkpoints import export_json
    return export_json(Path(args.checkpoint), Path(args.out), weights_only=args.weights_only), ""


def _import(args) -> tuple[Path, str]:
    from trainer.checkpoints import import_json
    return import_json(Path(args.json_file), Path(args.out)), ""


def _onnx(args) -> tuple[Path, str]:
    from trainer.export.inference import load_model_dir
    from trainer.export.onnx_export import export_onnx

    model, tokenizer = load_model_dir(args.model_dir)
    done = export_onnx(model, Path(args.out), vocab_size=len(tokenizer))
    return done.path, (f"; opset {done.opset}, max |difference| from PyTorch's logits {done.max_abs_diff:.2e} "
                       "in onnxruntime")


def _int8(args) -> tuple[Path, str]:
    from trainer.export.inference import load_model_dir
    from trainer.export.int8 import save_int8

    model, _ = load_model_dir(args.model_dir)
    return save_int8(model, Path(args.model_dir), Path(args.out)), "; load it with python -m trainer.generate"


_EXPORTS = {"json": _json, "import": _import, "onnx": _onnx, "int8": _int8}


def _source(args) -> str:
    if args.command == "json":
        return f"CHECKPOINT_DIR {args.checkpoint!r}"
    if args.command == "import":
        return f"JSON_FILE {args.json_file!r}"
    return f"MODEL_DIR {args.model_dir!r}"


def _check_paths(args) -> str | None:
    if args.command == "json":
        if not Path(args.checkpoint).is_dir():
            return f"CHECKPOINT_DIR {args.checkpoint!r}: no such directory; pass a step-NNNNNNN checkpoint directory"
        if Path(args.out).is_dir():
            return f"--out {args.out!r}: is a directory; pass the name of the JSON file to write"
        return _parent_problem(args.out)
    if args.command in ("onnx", "int8"):
        from trainer.export.model_dir import is_int8, model_dir_problem
        if problem := model_dir_problem(args.model_dir):
            return problem
        if is_int8(args.model_dir):
            return f"MODEL_DIR {args.model_dir!r} is already int8; pass the fp32 final_model/ it came from"
        if args.command == "onnx" and Path(args.out).is_dir():
            return f"--out {args.out!r}: is a directory; pass the name of the .onnx file to write"
        if args.command == "int8" and Path(args.out).exists():
            return f"--out {args.out!r} already exists; pass a new directory name (nothing is overwritten)"
        return _parent_problem(args.out)
    if not Path(args.json_file).is_file():
        return f"JSON_FILE {args.json_file!r}: no such file; pass a file written by `{PROG} json`"
    if Path(args.out).exists():
        return f"--out {args.out!r} already exists; pass a new directory name (nothing is overwritten)"
    return _parent_problem(args.out)


def _parent_problem(out: str) -> str | None:
    parent = Path(out).absolute().parent
    if not parent.is_dir():
        return f"--out {out!r}: its directory {parent} does not exist; create it first"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"--out {out!r}: its directory {parent} is not writable; write elsewhere"
    return None


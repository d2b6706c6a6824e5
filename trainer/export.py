"""Exports: the Hugging Face model directory, and checkpoints as one portable JSON file.

    python -m trainer.export json CHECKPOINT_DIR --out model.json [--weights-only]
    python -m trainer.export import model.json --out CHECKPOINT_DIR
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

if TYPE_CHECKING:   # transformers is imported by the caller; --help stays fast
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

    from trainer.config import TrainConfig

TRAINING_CONFIG_FILE = "training_config.json"
PROG = "python -m trainer.export"


def export_hf(model: "GPT2LMHeadModel", tokenizer: "PreTrainedTokenizerFast", cfg: "TrainConfig",
              out: Path) -> Path:
    """Write config.json, model.safetensors, tokenizer files and training_config.json to ``out``.

    Written beside ``out`` first and renamed into place, so ``out`` is always complete.
    """
    out = Path(out)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / TRAINING_CONFIG_FILE).write_text(json.dumps({"config": cfg.to_dict()}, indent=1, sort_keys=True))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def build_parser() -> Parser:
    p = Parser(prog=PROG, description="Convert checkpoints to and from one portable JSON file "
                                      "(tensors as base64 of their raw bytes).")
    sub = p.add_subparsers(dest="command", required=True, metavar="{json,import}")
    to_json = sub.add_parser("json", help="Write a checkpoint directory as one JSON file.")
    to_json.add_argument("checkpoint", help="A checkpoint directory, e.g. runs/my-model/checkpoints/step-0001000.")
    to_json.add_argument("--out", required=True, help="The JSON file to write.")
    to_json.add_argument("--weights-only", action="store_true",
                         help="Leave out the optimizer state (a third of the size; a resume restarts AdamW).")
    back = sub.add_parser("import", help="Rebuild a checkpoint directory from a JSON file.")
    back.add_argument("json_file", help="A file written by `json`.")
    back.add_argument("--out", required=True, help="The checkpoint directory to create (must not exist).")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from trainer.errors import CheckpointError, ConfigError
    from trainer.checkpoints import export_json, import_json

    problem = _check_paths(args)
    if problem:
        fail(PROG, ConfigError([problem]))
    started = time.perf_counter()
    try:
        if args.command == "json":
            out = export_json(Path(args.checkpoint), Path(args.out), weights_only=args.weights_only)
        else:
            out = import_json(Path(args.json_file), Path(args.out))
    except CheckpointError as exc:   # nothing was written: both write beside --out, then rename
        source = f"CHECKPOINT_DIR {args.checkpoint!r}" if args.command == "json" else f"JSON_FILE {args.json_file!r}"
        fail(PROG, CheckpointError(f"{source}: {exc}"))
    size = sum(f.stat().st_size for f in ([out] if out.is_file() else out.iterdir()))
    print(f"wrote {out} ({size / 1e6:.1f} MB) in {time.perf_counter() - started:.2f} s")
    return 0


def _check_paths(args) -> str | None:
    if args.command == "json":
        if not Path(args.checkpoint).is_dir():
            return f"CHECKPOINT_DIR {args.checkpoint!r}: no such directory; pass a step-NNNNNNN checkpoint directory"
        if Path(args.out).is_dir():
            return f"--out {args.out!r}: is a directory; pass the name of the JSON file to write"
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


if __name__ == "__main__":
    sys.exit(main())

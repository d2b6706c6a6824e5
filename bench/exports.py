"""The exported model in three forms, side by side: PyTorch fp32 (final_model/), ONNX in
onnxruntime, and dynamic int8 (python -m trainer.export onnx|int8).

    python -m bench exports [--repeats N] [--smoke]

One `quick` run trains the model (python -m trainer, no database), then each form is
measured on the same inputs: its size on disk, greedy generation speed (PyTorch forms use
their key/value cache; the ONNX graph has none and recomputes the prefix for every token),
and validation loss and perplexity on the run's own held-out split.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from bench.common import alternate, part, ratio, row
from trainer.metrics import perplexity

PROMPT_TOKENS, NEW_TOKENS = 16, 48


def train_quick(out: Path, cache_dir: str, smoke: bool) -> Path:
    steps = ["--max-steps", "20"] if smoke else []
    subprocess.run([sys.executable, "-m", "trainer", "--preset", "quick", "--out", str(out), "--no-db",
                    "--progress", "false", "--cache-dir", cache_dir, *steps], check=True,
                   stdout=subprocess.DEVNULL)
    return out / "final_model"


def validation_blocks(model_dir: Path, n_blocks: int) -> torch.Tensor:
    """The run's held-out split, as (n_blocks, block_size + 1) token blocks."""
    import json

    from trainer.data.batches import PackedBlocks
    from trainer.config import TrainConfig
    from trainer.data import prepare_data

    cfg = TrainConfig.from_dict(json.loads((model_dir / "training_config.json").read_text())["config"])
    val = PackedBlocks(prepare_data(cfg, log=lambda *_: None).val, cfg.block_size)
    n = min(n_blocks, len(val))
    return val.get(np.arange(n))


def mean_loss(logits_of: Callable[[torch.Tensor], np.ndarray], blocks: torch.Tensor, batch: int = 8) -> float:
    total, count = 0.0, 0
    for chunk in blocks.split(batch):
        logits = torch.from_numpy(np.asarray(logits_of(chunk[:, :-1]), dtype=np.float32))
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(),
                                                   reduction="sum").item()
        count += chunk[:, 1:].numel()
    return total / count


def greedy_onnx(session, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    from trainer.export.onnx_export import onnx_logits
    ids = prompt
    for _ in range(new_tokens):
        nxt = torch.from_numpy(onnx_logits(session, ids)[:, -1].argmax(-1, keepdims=True))
        ids = torch.cat([ids, nxt], dim=1)
    return ids


def tokens_per_s(generate: Callable[[], Any]) -> Callable[[], float]:
    def measure() -> float:
        started = time.perf_counter()
        generate()
        return NEW_TOKENS / (time.perf_counter() - started)
    return measure


def run(repeats: int, smoke: bool, cache_dir: str = ".cache/bench") -> dict[str, Any]:
    from trainer.export.int8 import WEIGHTS_FILE, save_int8
    from trainer.export.inference import load_model_dir
    from trainer.export.onnx_export import export_onnx, onnx_logits, onnx_session

    work = Path(tempfile.mkdtemp(prefix="bench-exports-"))
    fp32_dir = train_quick(work / "run", cache_dir, smoke)
    fp32, _ = load_model_dir(fp32_dir)
    onnx_file = export_onnx(fp32, work / "model.onnx").path
    int8_dir = save_int8(fp32, fp32_dir, work / "int8")
    int8, _ = load_model_dir(int8_dir)
    session = onnx_session(onnx_file)
    blocks = validation_blocks(fp32_dir, 16 if smoke else 128)
    prompt = blocks[:1, :PROMPT_TOKENS]

    def pt_generate(model):
        return lambda: model.generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                      do_sample=False, pad_token_id=0)

    contenders = {"fp32": pt_generate(fp32), "int8": pt_generate(int8),
                  "onnx": lambda: greedy_onnx(session, prompt, NEW_TOKENS)}
    with torch.inference_mode():
        for generate in contenders.values():      # warm-up: first calls allocate caches and pick kernels
            generate()
        speed = alternate({k: tokens_per_s(g) for k, g in contenders.items()}, repeats)
        losses = {"fp32": mean_loss(lambda x: fp32(input_ids=x).logits, blocks),
                  "int8": mean_loss(lambda x: int8(input_ids=x).logits, blocks),
                  "onnx": mean_loss(lambda x: onnx_logits(session, x), blocks)}
    sizes = {"fp32": (fp32_dir / "model.safetensors").stat().st_size, "onnx": onnx_file.stat().st_size,
             "int8": (int8_dir / WEIGHTS_FILE).stat().st_size}
    rows = [row(f"{k} generation", v, "tokens/s") for k, v in speed.items()]
    rows += [row(f"{k} size", [sizes[k] / 1e6], "MB", higher_is_better=False) for k in sizes]
    rows += [row(f"{k} validation loss", [losses[k]], "nats", higher_is_better=False) for k in losses]
    rows += [row(f"{k} validation perplexity", [perplexity(losses[k])], "", higher_is_better=False) for k in losses]
    return part("Exports: fp32, ONNX (onnxruntime) and dynamic int8", repeats=repeats, smoke=smoke,
                settings={"preset": "quick", "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS,
                          "validation_blocks": len(blocks), "threads": torch.get_num_threads()},
                method="one quick run (python -m trainer --no-db); greedy generation of the same prompt, "
                       "forms interleaved round by round; validation loss over the first blocks of the "
                       "run's held-out split. ONNX has no key/value cache: it recomputes the prefix per token.",
                rows=rows,
                ratios=[ratio("int8 / fp32 generation speed", speed["int8"], speed["fp32"]),
                        ratio("onnx / fp32 generation speed", speed["onnx"], speed["fp32"])],
                notes=[f"validation perplexity difference int8 - fp32: "
                       f"{perplexity(losses['int8']) - perplexity(losses['fp32']):+.3f}",
                       f"onnx - fp32 validation loss: {losses['onnx'] - losses['fp32']:+.2e} nats"])

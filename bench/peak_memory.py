"""Peak memory of one optimizer step of the kaggle-t4 model: micro-batch 8 against 4 x 2.

    python -m bench.peak_memory [--precision fp32|bf16] [--steps 2]

Each configuration runs in a fresh process, so its peak resident set size (ru_maxrss) is its
own; on a GPU the peak allocated CUDA memory is reported as well. Same model, same effective
batch (8 sequences of 512 tokens), same data.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

CONFIGS = [(8, 1), (4, 2)]


def one(micro: int, accum: int, precision: str, steps: int) -> dict:
    import numpy as np
    import torch

    from trainer.config import TrainConfig
    from trainer.device import place
    from trainer.model import build_model, build_optimizer
    from trainer.presets import preset_values

    cfg = TrainConfig.from_dict({**preset_values("kaggle-t4"), "micro_batch": micro, "grad_accum": accum,
                                 "precision": precision, "device": "auto"})
    placement = place(cfg)
    model = build_model(cfg, 50257, 50256).to(placement.device)
    optimizer = build_optimizer(model, cfg)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rng = np.random.default_rng(0)
    for _ in range(steps):
        tokens = torch.from_numpy(rng.integers(0, 50257, (micro * accum, cfg.block_size + 1)))
        for chunk in tokens.to(placement.device).split(micro):
            with placement.autocast():
                logits = model(input_ids=chunk[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), chunk[:, 1:].flatten()) / accum
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    out = {"micro_batch": micro, "grad_accum": accum, "precision": placement.precision,
           "rss_before_steps_mb": before, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if placement.device.type == "cuda":
        out["peak_cuda_allocated_mb"] = torch.cuda.max_memory_allocated() / 1024 ** 2
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--precision", default="fp32")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(one(*args.child, args.precision, args.steps)))
        return
    rows = []
    for micro, accum in CONFIGS:
        cmd = [sys.executable, "-m", "bench.peak_memory", "--precision", args.precision, "--steps", str(args.steps),
               "--child", str(micro), str(accum)]
        rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]))
    for r in rows:
        extra = f", peak CUDA {r['peak_cuda_allocated_mb']:,.0f} MB" if "peak_cuda_allocated_mb" in r else ""
        print(f"micro-batch {r['micro_batch']} x {r['grad_accum']} ({r['precision']}): peak RSS "
              f"{r['peak_rss_mb']:,.0f} MB (model and optimizer built: {r['rss_before_steps_mb']:,.0f} MB){extra}")


if __name__ == "__main__":
    main()

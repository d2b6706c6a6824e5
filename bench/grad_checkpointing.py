"""Gradient checkpointing on the kaggle-t4 model: peak memory and step time, off against on.

    python -m bench.grad_checkpointing [--precision fp32] [--micro-batch 8] [--steps 3] [--rounds 1]

Each measurement runs in a fresh process, so its peak resident set size (ru_maxrss, as
bench.peak_memory reads it) is its own; rounds alternate off/on so that a drifting machine
load falls on both. The step is the trainer's own (trainer.model.next_token_loss, AdamW from
build_optimizer) on random tokens of the preset's context (512); the first step is left out
of the time (allocations, lazy initialisation). On a GPU the peak allocated CUDA memory is
reported as well. Reported: peak RSS above the RSS with model and optimizer built (what
the activations take), and the median time of the timed steps.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

VOCAB, EOS = 50257, 50256     # the GPT-2 tokenizer kaggle-t4 uses


def one(checkpointing: bool, precision: str, micro: int, steps: int) -> dict:
    import numpy as np
    import torch

    from trainer.config import TrainConfig
    from trainer.device import place
    from trainer.memory import enable_gradient_checkpointing
    from trainer.model import build_model, build_optimizer, next_token_loss
    from trainer.presets import preset_values

    cfg = TrainConfig.from_dict({**preset_values("kaggle-t4"), "micro_batch": micro, "grad_accum": 1,
                                 "precision": precision, "device": "auto", "dropout": 0.0})
    placement = place(cfg)
    model = build_model(cfg, VOCAB, EOS).to(placement.device)
    if checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    optimizer = build_optimizer(model, cfg)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rng, seconds = np.random.default_rng(0), []
    for _ in range(steps):
        batch = torch.from_numpy(rng.integers(0, VOCAB, (micro, cfg.block_size + 1))).to(placement.device)
        start = time.perf_counter()
        next_token_loss(model, batch, placement.autocast).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if placement.device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    out = {"gradient_checkpointing": checkpointing, "precision": placement.precision, "micro_batch": micro,
           "block_size": cfg.block_size, "rss_before_steps_mb": before,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "step_s": statistics.median(seconds[1:] or seconds), "step_s_all": seconds,
           "device": placement.description, "threads": torch.get_num_threads()}
    if placement.device.type == "cuda":
        out["peak_cuda_allocated_mb"] = torch.cuda.max_memory_allocated() / 1024 ** 2
    return out


def child(checkpointing: bool, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "bench.grad_checkpointing", "--precision", args.precision, "--micro-batch",
           str(args.micro_batch), "--steps", str(args.steps), "--child", "on" if checkpointing else "off"]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.splitlines()[-1])


def table(rows: list[dict]) -> str:
    lines = ["| gradient checkpointing | peak RSS (MB) | activations: peak - built (MB) | step (s) |",
             "|---|---|---|---|"]
    for r in rows:
        cuda = f"; peak CUDA {r['peak_cuda_allocated_mb']:,.0f} MB" if "peak_cuda_allocated_mb" in r else ""
        lines.append(f"| {'on' if r['gradient_checkpointing'] else 'off'} | {r['peak_rss_mb']:,.0f} | "
                     f"{r['peak_rss_mb'] - r['rss_before_steps_mb']:,.0f}{cuda} | {r['step_s']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--precision", default="fp32")
    p.add_argument("--micro-batch", type=int, default=8, help="Sequences of 512 tokens per step (the preset's 8).")
    p.add_argument("--steps", type=int, default=3, help="Optimizer steps per process; the first is not timed.")
    p.add_argument("--rounds", type=int, default=1, help="Fresh off/on process pairs.")
    p.add_argument("--json", default=None, metavar="FILE", help="Also write the rows as JSON.")
    p.add_argument("--child", choices=("on", "off"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(one(args.child == "on", args.precision, args.micro_batch, args.steps)))
        return
    rows = [child(on, args) for _ in range(args.rounds) for on in (False, True)]
    print(f"kaggle-t4 model, micro-batch {args.micro_batch} x 512 tokens, {rows[0]['precision']}, "
          f"{rows[0]['device']}; {args.steps} steps per fresh process, {args.rounds} round(s)")
    print(table(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

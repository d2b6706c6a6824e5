"""Peak memory of one optimizer step of the kaggle-t4 model: micro-batch 8 against 4 x 2, and
the full loss against the chunked one (trainer.loss); and of the loss alone at that size.

    python -m bench.peak_memory [--precision fp32|bf16] [--steps 2]
    python -m bench.peak_memory --loss [--precision fp32|bf16] [--steps 3]
    python -m bench.peak_memory --loss --device cuda --precision fp16    # the loss on a GPU

Each configuration runs in a fresh process, so its peak resident set size (ru_maxrss) is its
own; on a GPU the peak allocated CUDA memory is reported as well. Same model, same effective
batch (8 sequences of 512 tokens), same data. ``--loss`` runs the output projection and the
cross-entropy alone on hidden states of one kaggle-t4 micro-batch (8 x 512 tokens x 256, GPT-2's
50,257-token vocabulary), forward and backward: its peak above the inputs, its time (rough on a
shared machine), and its loss and gradients against the full loss's. ``--loss --device cuda`` runs
it on cuda:0 and measures the peak allocated CUDA memory above the inputs instead, all in this
process (the allocator's peak resets per configuration; a fresh process is only needed for RSS).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

CONFIGS = [(8, 1, 0), (4, 2, 0), (8, 1, 1024)]     # micro-batch, accumulation, loss chunk (0: full)
LOSS_CHUNKS = (0, 2048, 1024, 512)                 # tokens per chunk of the loss alone (0: full)


def one(micro: int, accum: int, chunk_tokens: int, precision: str, steps: int) -> dict:
    import numpy as np
    import torch

    from trainer.config import TrainConfig
    from trainer.device import place
    from trainer.model import build_model, build_optimizer, next_token_loss
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
            (next_token_loss(model, chunk, placement.autocast, chunk_tokens=chunk_tokens) / accum).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    out = {"micro_batch": micro, "grad_accum": accum, "loss_chunk_tokens": chunk_tokens,
           "precision": placement.precision,
           "rss_before_steps_mb": before, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if placement.device.type == "cuda":
        out["peak_cuda_allocated_mb"] = torch.cuda.max_memory_allocated() / 1024 ** 2
    return out


def child(cmd: list[str]) -> dict:
    """The last line of a fresh process's output: its measurements, as JSON."""
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])


def loss_alone(chunk_tokens: int, precision: str, steps: int, grads_to: str, device: str = "cpu") -> dict:
    """The projection and cross-entropy of one kaggle-t4 micro-batch, forward and backward, ``steps``
    times; its loss and gradients saved to ``grads_to`` for the parent to compare. On ``cuda`` the
    peak is the allocator's (torch.cuda.max_memory_allocated) above the inputs, not the RSS."""
    import contextlib

    import torch

    from trainer.loss import chunked_cross_entropy

    tokens, width, vocab = 8 * 512, 256, 50257
    on = torch.device("cuda:0" if device == "cuda" else "cpu")
    g = torch.Generator().manual_seed(0)      # drawn on the CPU: the same inputs on either device
    hidden = torch.randn(tokens, width, generator=g).to(on).requires_grad_()     # as after the final layer norm
    weight = (0.02 * torch.randn(vocab, width, generator=g)).to(on).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=g).to(on)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    memory = Memory(on)
    seconds = []
    for _ in range(steps):
        hidden.grad = weight.grad = None
        started = memory.now()
        if chunk_tokens:
            loss = chunked_cross_entropy(hidden, weight, targets, chunk_tokens, dtype=dtype)
        else:    # the full loss, as trainer.model.next_token_loss computes it with chunk_tokens=0
            with (contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(on.type, dtype=dtype)):
                logits = torch.nn.functional.linear(hidden, weight)       # (tokens, vocab)
            loss = torch.nn.functional.cross_entropy(logits.float(), targets)
            del logits
        loss.backward()
        seconds.append(memory.now() - started)
    torch.save({"loss": loss.detach().cpu(), "hidden": hidden.grad.cpu(), "weight": weight.grad.cpu()}, grads_to)
    return {"loss_chunk_tokens": chunk_tokens, "precision": precision, "device": on.type,
            "loss_peak_mb": memory.peak_mb() - memory.before_mb, "inputs_rss_mb": memory.before_mb,
            "seconds": sorted(seconds)[len(seconds) // 2]}


class Memory:
    """The peak of loss_alone: the process's peak RSS on the CPU; on a GPU the allocator's peak,
    reset here, with the clock read after a synchronize (a GPU's work is queued, not done)."""

    def __init__(self, device):
        import torch

        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before_mb = torch.cuda.memory_allocated() / 1024 ** 2
        else:
            self.before_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def now(self) -> float:
        import time

        import torch

        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def peak_mb(self) -> float:
        import torch

        if self.cuda:
            return torch.cuda.max_memory_allocated() / 1024 ** 2
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def compare_losses(rows: list[dict], paths: list[str]) -> None:
    """Each row's loss and gradients against the full loss's (the first row)."""
    import torch

    full = torch.load(paths[0])
    for row, path in zip(rows, paths):
        mine = torch.load(path)
        row["loss"] = mine["loss"].item()
        row["loss_rel_diff"] = abs(mine["loss"].item() / full["loss"].item() - 1)
        row["grad_max_rel_diff"] = max(((mine[k] - full[k]).abs().max() / full[k].abs().max()).item()
                                       for k in ("hidden", "weight"))


def run_losses(precision: str, steps: int, device: str = "cpu") -> list[dict]:
    """Every chunk size of LOSS_CHUNKS: in a fresh process each on the CPU (a process's peak RSS
    never comes down), in this one on a GPU (the allocator's peak is reset for each)."""
    import tempfile

    rows, paths = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for chunk in LOSS_CHUNKS:
            paths.append(f"{tmp}/grads-{chunk}.pt")
            if device == "cuda":
                rows.append(loss_alone(chunk, precision, steps, paths[-1], device))
                continue
            cmd = [sys.executable, "-m", "bench.peak_memory", "--loss", "--precision", precision, "--steps",
                   str(steps), "--child", str(chunk), paths[-1]]
            rows.append(child(cmd))
        compare_losses(rows, paths)
    full = rows[0]["loss_peak_mb"]
    for r in rows:
        name = f"chunks of {r['loss_chunk_tokens']} tokens" if r["loss_chunk_tokens"] else "full logits"
        what = "peak CUDA allocated" if r.get("device") == "cuda" else "peak"
        print(f"loss alone, {name:22} ({r['precision']}): {what} {r['loss_peak_mb']:,.0f} MB above its inputs "
              f"({r['loss_peak_mb'] / full:.2f}x the full loss's), {r['seconds']:.2f} s forward and backward, "
              f"loss {r['loss']:.6f} (relative difference {r['loss_rel_diff']:.1e}), gradients within "
              f"{r['grad_max_rel_diff']:.1e} of the largest")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--precision", default="fp32")
    p.add_argument("--steps", type=int, default=None, help="Steps per configuration (default: 2; 3 with --loss).")
    p.add_argument("--loss", action="store_true", help="The loss alone: full against chunked.")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="With --loss: where the loss runs (default: cpu; cuda: cuda:0, its allocated memory).")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    steps = args.steps or (3 if args.loss else 2)
    if args.child:
        result = (loss_alone(int(args.child[0]), args.precision, steps, args.child[1]) if args.loss
                  else one(*map(int, args.child), args.precision, steps))
        print(json.dumps(result))
        return
    if args.device == "cuda":
        import torch

        if not args.loss:
            p.error("--device cuda: only with --loss (the step configurations run on the GPU when there is one)")
        if not torch.cuda.is_available():
            p.error("--device cuda: no CUDA GPU visible to torch on this machine; leave --device out")
    if args.loss:
        run_losses(args.precision, steps, args.device)
        return
    rows = []
    for micro, accum, chunk in CONFIGS:
        cmd = [sys.executable, "-m", "bench.peak_memory", "--precision", args.precision, "--steps", str(steps),
               "--child", str(micro), str(accum), str(chunk)]
        rows.append(child(cmd))
    for r in rows:
        extra = f", peak CUDA {r['peak_cuda_allocated_mb']:,.0f} MB" if "peak_cuda_allocated_mb" in r else ""
        loss = f"loss in chunks of {r['loss_chunk_tokens']}" if r["loss_chunk_tokens"] else "full loss"
        print(f"micro-batch {r['micro_batch']} x {r['grad_accum']}, {loss} ({r['precision']}): peak RSS "
              f"{r['peak_rss_mb']:,.0f} MB (model and optimizer built: {r['rss_before_steps_mb']:,.0f} MB){extra}")


if __name__ == "__main__":
    main()

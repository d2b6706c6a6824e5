"""Where an optimizer step's time goes, on the throughput part's model: the pieces timed apart,
and what one checkpoint of that model costs each loop.

Each iteration times every piece once, in the same order, so load changes hit all pieces
alike; the medians over the iterations are reported. Both AdamW variants step the same
parameters (each with its own state): the trainer (trainer.model.build_optimizer) and the HF
Trainer use the fused implementation on a CPU; the plain loop, as nanoGPT, the default (foreach).
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from trainer.config import TrainConfig
from trainer.model import build_model, build_optimizer

FOREACH = "AdamW step, foreach (plain loop)"
FUSED = "AdamW step, fused (trainer, HF Trainer)"
STALL = "checkpoint: trainer background save, stall"
WRITE = "checkpoint: trainer background save, until written and fsynced"
TORCH_SAVE = "checkpoint: torch.save (plain loop)"


def foreach_copy(optimizer: torch.optim.AdamW) -> torch.optim.AdamW:
    """The same parameter groups and settings in the foreach implementation (its own state)."""
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]
    defaults = optimizer.defaults
    return torch.optim.AdamW(groups, lr=defaults["lr"], betas=defaults["betas"], foreach=True)


def measure(cfg: TrainConfig, vocab_size: int, iterations: int) -> dict[str, list[float]]:
    """Milliseconds of each piece of a step, ``iterations`` times, then of the saves."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, vocab_size, 0)
    x = torch.randint(vocab_size, (cfg.micro_batch, cfg.block_size + 1))
    fused = build_optimizer(model, cfg)        # the trainer's own: fused on a CPU too
    foreach = foreach_copy(fused)

    def forward_backward() -> None:
        logits = model(input_ids=x[:, :-1]).logits
        F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).backward()

    pieces: dict[str, Callable[[], Any]] = {
        "forward + backward": forward_backward,
        "clip_grad_norm_": lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip),
        FOREACH: foreach.step,
        FUSED: fused.step,
    }
    forward_backward()
    for opt in (foreach, fused):        # allocate the optimizer states before timing
        opt.step()
    times: dict[str, list[float]] = {name: [] for name in pieces}
    for _ in range(iterations):
        model.zero_grad(set_to_none=True)       # as after every optimizer step: fresh gradients
        for name, piece in pieces.items():
            start = time.perf_counter()
            piece()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {**times, **saves(cfg, model, fused, max(1, iterations // 4))}


def saves(cfg: TrainConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
          iterations: int) -> dict[str, list[float]]:
    """A checkpoint of this model: the trainer's stall and background write, the plain loop's torch.save.
    The background write overlaps the trainer's next steps; in the interleaved runs, what outlasts
    the next step runs during the other contenders' turns."""
    from bench.checkpoints import Saves

    work = Path(tempfile.mkdtemp(prefix="bench-breakdown-"))
    try:
        s = Saves(work, cfg, model, optimizer)
        s.trainer_background()                  # allocates the reused host buffers
        s.durable.clear()
        stall, plain = [], []
        for _ in range(iterations):
            stall.append(s.trainer_background() * 1e3)
            plain.append(s.torch_save(False) * 1e3)
        return {STALL: stall, WRITE: [t * 1e3 for t in s.durable], TORCH_SAVE: plain}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def fused_note(pieces: dict[str, list[float]]) -> str:
    """What the fused AdamW would save per step, from the minimums: on a loaded machine the medians
    of millisecond pieces measure preemption as much as the work."""
    best = {k: min(v) for k, v in pieces.items()}
    saved = best[FOREACH] - best[FUSED]
    step = best["forward + backward"] + best["clip_grad_norm_"] + best[FOREACH]
    return (f"fastest of each piece: AdamW foreach {best[FOREACH]:.1f} ms, fused {best[FUSED]:.1f} ms; the fused "
            f"step saves {saved:.1f} ms, {100 * saved / step:.1f}% of the fastest forward + backward + clip + "
            "foreach step (the trainer and the HF Trainer use it on a CPU; the plain loop, as nanoGPT, foreach)")

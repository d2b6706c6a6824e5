"""How many optimizer steps a run has, and the learning rate as a pure function of the step:
nothing to save, exact on resume."""
from __future__ import annotations

import math

from trainer.config import TrainConfig


def steps_per_epoch(train_tokens: int, cfg: TrainConfig, step_batch: int | None = None) -> int:
    """Optimizer steps in one pass over a training stream of ``train_tokens`` tokens.

    The stream is cut into blocks of block_size + 1 tokens (trainer.batches.PackedBlocks);
    a step takes ``step_batch`` of them (default ``cfg.effective_batch``; with several
    processes, times their number), and the blocks left over are not used.
    """
    blocks = max(0, (train_tokens - 1) // cfg.block_size)
    return blocks // (step_batch or cfg.effective_batch)


def total_steps(train_tokens: int, cfg: TrainConfig, step_batch: int | None = None) -> int:
    """The run's optimizer steps: every epoch's, or ``cfg.max_steps`` if fewer."""
    total = steps_per_epoch(train_tokens, cfg, step_batch) * cfg.epochs
    return min(total, cfg.max_steps) if cfg.max_steps else total


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warmup to cfg.lr, then cosine, linear or no decay to cfg.lr * cfg.min_lr_ratio."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "linear":
        return floor + (cfg.lr - floor) * (1.0 - progress)
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

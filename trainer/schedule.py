"""How many optimizer steps a run has, and the learning rate as a pure function of the step:
nothing to save, exact on resume."""
from __future__ import annotations

import math

from trainer.batching import Batching
from trainer.config import TrainConfig


def steps_per_epoch(train_tokens: int, cfg: TrainConfig, batching: Batching | None = None) -> int:
    """Optimizer steps in one pass over a training stream of ``train_tokens`` tokens.

    The stream is cut into blocks of block_size + 1 tokens (trainer.data.batches.PackedBlocks); a step
    takes ``batching.per_step`` of them (default: the config's, on one process), and the blocks
    left over are not used.
    """
    blocks = max(0, (train_tokens - 1) // cfg.block_size)
    return (batching or Batching.from_config(cfg)).steps_per_epoch(blocks)


def total_steps(train_tokens: int, cfg: TrainConfig, batching: Batching | None = None) -> int:
    """The run's optimizer steps: every epoch's, or ``cfg.max_steps`` if fewer."""
    total = steps_per_epoch(train_tokens, cfg, batching) * cfg.epochs
    return min(total, cfg.max_steps) if cfg.max_steps else total


def lr_at(step: int, cfg: TrainConfig, total_steps: int, peak: float | None = None) -> float:
    """Linear warmup to ``peak``, then cosine, linear or no decay to peak * cfg.min_lr_ratio.

    ``peak`` is cfg.lr unless given: each optimizer param group follows the schedule from its own
    peak, its ``group["base_lr"]`` (--lr for AdamW's, --muon-lr for Muon's; keep_base_lrs).
    """
    peak = cfg.lr if peak is None else peak
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    floor = peak * cfg.min_lr_ratio
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "linear":
        return floor + (peak - floor) * (1.0 - progress)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def keep_base_lrs(optimizer):
    """``optimizer`` with each group's ``base_lr`` (its peak, from this run's config) kept when a
    checkpoint is loaded: the saved groups replace the groups, and a resumed run follows its own
    --lr/--muon-lr, as it did before the peaks were stored (a checkpoint without them loads too)."""
    peaks = [group["base_lr"] for group in optimizer.param_groups]

    def restore(opt) -> None:
        for group, peak in zip(opt.param_groups, peaks):
            group["base_lr"] = peak
    optimizer.register_load_state_dict_post_hook(restore)
    return optimizer

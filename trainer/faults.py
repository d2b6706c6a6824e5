"""Recovering in place from memory faults and non-finite losses: decisions, not actions.

Each function is given what it looks at (the micro-batch split, the train state, the
checkpoint store, the model's parts) and returns what the training loop should do next;
the loop applies it where the weights and the data position agree.

- Out of memory in a forward or backward pass: ``split_after_oom`` halves the micro-batch
  and doubles the accumulation (the effective batch stays the same); the loop redoes the
  interrupted step from its first micro-batch, so no sample is skipped or counted twice.
  At micro-batch 1 there is nothing left to halve: the run ends, failed, with a checkpoint
  of its last complete step.
- A non-finite loss or gradient norm skips the update (the weights stay as they were).
  ``count_nonfinite`` says when ``max_nonfinite_steps`` in a row call for a reload;
  ``reload_before_streak`` then returns the state of the newest checkpoint from before the
  streak, with half the learning rate, once; a second streak ends the run as diverged.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np
import torch

from trainer.batches import PackedBlocks
from trainer.checkpoints import CheckpointStore, load_checkpoint
from trainer.device import Placement
from trainer.errors import StopTraining
from trainer.files import json_float
from trainer.memory import free_memory, largest_micro_batch
from trainer.model import next_token_loss
from trainer.recorder import EVENT_NONFINITE, EVENT_OOM, Recorder
from trainer.state import Split, TrainState

DIVERGED = "diverged"     # the start of a failed run's reason after a second streak (studies prune it)


def split_after_oom(split: Split, step: int, exc: BaseException, recorder: Recorder, log) -> Split:
    """The smaller split to redo ``step`` with; raises StopTraining (failed) at micro-batch 1.

    The caller has dropped the failed step's half-accumulated gradients.
    """
    free_memory()
    if split.micro_batch == 1:
        raise StopTraining("failed", f"out of memory at micro-batch 1 in step {step}: the model does not fit; "
                           "use a smaller --block-size, --n-embd or --n-layer, or --precision bf16/fp16")
    effective = split.micro_batch * split.grad_accum
    micro = max(n for n in range(1, split.micro_batch // 2 + 1) if effective % n == 0)
    new = Split(micro, effective // micro)
    log(f"out of memory in step {step}: micro-batch {split.micro_batch} x {split.grad_accum} -> {new.micro_batch} x "
        f"{new.grad_accum} (the same {effective} sequences); redoing the step")
    recorder.log_event(EVENT_OOM, step, {
        "old_micro_batch": split.micro_batch, "old_grad_accum": split.grad_accum,
        "new_micro_batch": new.micro_batch, "new_grad_accum": new.grad_accum, "error": str(exc)[:300]})
    return new


def is_nonfinite(loss: float, grad_norm: float, scaler_enabled: bool) -> bool:
    """A step whose update must be skipped. With fp16 an infinite gradient norm alone is the
    gradient scaler's overflow, which it skips and handles itself."""
    if not math.isfinite(loss):
        return True
    return not math.isfinite(grad_norm) and not scaler_enabled


def count_nonfinite(state: TrainState, loss: float, grad_norm: float, limit: int, recorder: Recorder) -> bool:
    """Count a step whose update was skipped; True when the streak calls for a reload.

    Raises StopTraining (failed, diverged) when the streak comes after the learning rate was halved.
    """
    state.nonfinite_streak += 1
    state.nonfinite_total += 1
    step = state.step + 1
    recorder.log_event(EVENT_NONFINITE, step, {"loss": json_float(loss), "grad_norm": json_float(grad_norm),
                                               "streak": state.nonfinite_streak, "total": state.nonfinite_total})
    if state.nonfinite_streak < limit:
        return False
    if state.lr_scale < 1.0:
        raise StopTraining("failed", f"{DIVERGED}: {state.nonfinite_streak} non-finite steps in a row at step "
                           f"{step}, after the learning rate had been halved once")
    return True


def reload_before_streak(state: TrainState, store: CheckpointStore | None, *, model: torch.nn.Module,
                         optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                         recorder: Recorder, log) -> TrainState:
    """The state to continue from after a streak: the newest checkpoint written before it began
    (loaded into model, optimizer and scaler), else the current one; with half the lr either way."""
    streak_end, streak_start = state.step, state.step - state.nonfinite_streak + 1
    before = store.newest_before(streak_start) if store is not None else None
    if before is not None:
        reloaded, _ = load_checkpoint(before.path, model=model, optimizer=optimizer, scaler=scaler)
        reloaded.run_id = state.run_id
        how = f"reloaded {before.path} (step {reloaded.step})"
    else:
        reloaded = dataclasses.replace(state)
        how = "no checkpoint precedes the streak: continuing from the current weights (never updated by it)"
    reloaded.lr_scale, reloaded.nonfinite_streak = state.lr_scale * 0.5, 0
    log(f"{state.nonfinite_streak} non-finite steps in a row up to step {streak_end}: {how}; "
        f"learning rate x{reloaded.lr_scale:g}")
    recorder.log_event(EVENT_NONFINITE, streak_end, {"action": "reload", "detail": how,
                                                     "lr_scale": reloaded.lr_scale})
    return reloaded


def pick_micro_batch(model: torch.nn.Module, blocks: PackedBlocks, placement: Placement, split: Split,
                     log: Callable[[str], None]) -> Split:
    """--micro-batch auto: the largest micro-batch that fits, at the same effective batch."""
    def try_batch(n: int) -> None:
        batch = blocks.get(np.arange(n) % len(blocks)).to(placement.device)
        next_token_loss(model, batch, placement.autocast).backward()
        model.zero_grad(set_to_none=True)

    effective = split.micro_batch * split.grad_accum
    micro = largest_micro_batch(try_batch, effective, placement.device, split.micro_batch)
    free_memory()
    log(f"--micro-batch auto: {micro} x {effective // micro} accumulation steps"
        + ("" if placement.device.type == "cuda" else " (no GPU memory to probe: the configured micro-batch)"))
    return Split(micro, effective // micro)

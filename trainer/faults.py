"""Recovering in place from memory faults and non-finite losses.

- Out of memory in a forward or backward pass: free the gradients and the cache, halve the
  micro-batch, double the accumulation (the effective batch stays the same) and redo the
  interrupted optimizer step from its first micro-batch, so no sample is skipped or counted
  twice. At micro-batch 1 there is nothing left to halve: the run ends, failed, with a
  checkpoint of its last complete step.
- A non-finite loss or gradient norm skips the update (the weights stay as they were). After
  ``max_nonfinite_steps`` in a row, the newest checkpoint from before the streak is reloaded
  and the learning rate halved, once; a second streak ends the run as diverged.
"""
from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from trainer.checkpoint import read_checkpoint
from trainer.errors import StopTraining
from trainer.memory import free_memory, largest_micro_batch
from trainer.recorder import EVENT_NONFINITE, EVENT_OOM
from trainer.snapshot import restore
from trainer.store import scan

if TYPE_CHECKING:
    from trainer.loop import Trainer

DIVERGED = "diverged"


def recover_from_oom(t: "Trainer", exc: BaseException) -> None:
    """Shrink the micro-batch after an out-of-memory error, or end the run at micro-batch 1."""
    state, step = t.state, t.state.step + 1
    t.optimizer.zero_grad(set_to_none=True)   # the half-accumulated gradients of the failed step
    free_memory()
    old = (state.micro_batch, state.grad_accum)
    if state.micro_batch == 1:
        t.in_step = False                      # the position still matches the weights
        raise StopTraining("failed", f"out of memory at micro-batch 1 in step {step}: the model does not fit; "
                           "use a smaller --block-size, --n-embd or --n-layer, or --precision bf16/fp16")
    effective = state.micro_batch * state.grad_accum
    state.micro_batch = max(n for n in range(1, state.micro_batch // 2 + 1) if effective % n == 0)
    state.grad_accum = effective // state.micro_batch
    state.oom_recoveries += 1
    t.log(f"out of memory in step {step}: micro-batch {old[0]} x {old[1]} -> {state.micro_batch} x "
          f"{state.grad_accum} (the same {effective} sequences); redoing the step")
    t.recorder.log_event(EVENT_OOM, step, {
        "old_micro_batch": old[0], "old_grad_accum": old[1], "new_micro_batch": state.micro_batch,
        "new_grad_accum": state.grad_accum, "error": str(exc)[:300]})


def is_nonfinite(t: "Trainer", loss: float, grad_norm: float) -> bool:
    """A step whose update must be skipped. With fp16 an infinite gradient norm alone is the
    gradient scaler's overflow, which it skips and handles itself."""
    if not math.isfinite(loss):
        return True
    return not math.isfinite(grad_norm) and not t.scaler.is_enabled()


def skip_update(t: "Trainer", loss: float, grad_norm: float) -> None:
    """Count a non-finite step whose update was skipped; act on a streak."""
    state, cfg = t.state, t.cfg
    state.nonfinite_streak += 1
    state.nonfinite_total += 1
    step = state.step + 1
    t.recorder.log_event(EVENT_NONFINITE, step, {"loss": _json_float(loss), "grad_norm": _json_float(grad_norm),
                                                 "streak": state.nonfinite_streak, "total": state.nonfinite_total})
    if state.nonfinite_streak < cfg.max_nonfinite_steps:
        return
    if state.lr_scale < 1.0:
        raise StopTraining("failed", f"{DIVERGED}: {state.nonfinite_streak} non-finite steps in a row at step "
                           f"{step}, after the learning rate had been halved once")
    t.reload_after_streak = True  # done by the loop between steps, where the position is consistent


def reload_before_streak(t: "Trainer") -> None:
    """Go back to the newest checkpoint written before the streak began, with half the lr."""
    state = t.state
    streak_end = state.step
    streak_start = state.step - state.nonfinite_streak + 1
    candidates = []
    if t.store is not None:
        t.store.drain()
        candidates = [s for s in scan(t.store.root) if s.info.step < streak_start]
    run_id, halved = state.run_id, state.lr_scale * 0.5
    if candidates:
        path = candidates[0].path                       # scan() lists newest first
        restored = restore(read_checkpoint(path), model=t.model, optimizer=t.optimizer, scaler=t.scaler,
                           where=f"checkpoint {path}")
        for f in dataclasses.fields(restored):  # in place: the loop holds this state object
            setattr(state, f.name, getattr(restored, f.name))
        state.run_id = run_id
        how = f"reloaded {path} (step {state.step})"
    else:
        how = "no checkpoint precedes the streak: continuing from the current weights (never updated by it)"
    state.lr_scale, state.nonfinite_streak = halved, 0
    t.log(f"{t.cfg.max_nonfinite_steps} non-finite steps in a row up to step {streak_end}: {how}; "
          f"learning rate x{halved:g}")
    t.recorder.log_event(EVENT_NONFINITE, streak_end, {"action": "reload", "detail": how, "lr_scale": halved})


def pick_micro_batch(t: "Trainer") -> None:
    """--micro-batch auto: the largest micro-batch that fits, at the same effective batch."""
    def try_batch(n: int) -> None:
        batch = t.train_blocks.get(np.arange(n) % len(t.train_blocks)).to(t.device)
        with t.placement.autocast():
            logits = t.model(input_ids=batch[:, :-1]).logits
        F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten()).backward()
        t.model.zero_grad(set_to_none=True)

    state, effective = t.state, t.cfg.effective_batch
    state.micro_batch = largest_micro_batch(try_batch, effective, t.device, state.micro_batch)
    state.grad_accum = effective // state.micro_batch
    free_memory()
    t.log(f"--micro-batch auto: {state.micro_batch} x {state.grad_accum} accumulation steps"
          + ("" if t.device.type == "cuda" else " (no GPU memory to probe: the configured micro-batch)"))


def clear_cache_if_due(t: "Trainer") -> None:
    every = t.cfg.clear_cache_every
    if every and t.state.step % every == 0 and t.device.type == "cuda":
        torch.cuda.empty_cache()


def _json_float(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)

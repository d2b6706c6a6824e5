"""Recovering in place from memory faults and non-finite losses: decisions, for the loop to apply.

Each function is given what it looks at (the micro-batch split, the train state, the
checkpoint store, the model's parts) and returns what the training loop should do next;
the loop applies it where the weights and the data position agree. One function acts as
well as decides: ``reload_before_streak`` loads the checkpoint it chose into the model,
optimizer and scaler, and returns the state that goes with them. The memory probe of
--micro-batch auto is set-up (trainer.setup), not recovery.

- Out of memory in a forward or backward pass: ``remedy_after_oom`` climbs the memory
  ladder. First it halves the micro-batch and doubles the accumulation (the effective
  batch stays the same). At micro-batch 1, with --gradient-checkpointing auto, it turns on
  activation checkpointing (each block's activations are recomputed in backward instead of
  kept). Either way the loop redoes the interrupted step from its first micro-batch, so no
  sample is skipped or counted twice. With nothing left to try the run ends, failed, with
  a checkpoint of its last complete step.
- A non-finite loss or gradient norm skips the update (the weights stay as they were).
  ``count_nonfinite`` says when ``max_nonfinite_steps`` in a row call for a reload;
  ``reload_before_streak`` then returns the state of the newest checkpoint from before the
  streak, with half the learning rate, once; a second streak ends the run as diverged.
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch

from trainer.batching import Batching, Split
from trainer.checkpoints import CheckpointStore, load_checkpoint
from trainer.errors import RankLost, StopTraining
from trainer.files import json_float
from trainer.recorder import EVENT_NONFINITE, EVENT_OOM, Recorder
from trainer.state import TrainState

DIVERGED = "diverged"     # the start of a failed run's reason after a second streak (studies prune it)
HALVE_MICRO_BATCH = "halve_micro_batch"             # the remedies, as the oom event names them
GRADIENT_CHECKPOINTING = "gradient_checkpointing"


class OomRemedy(NamedTuple):
    """What to redo the step with after an out-of-memory error."""

    kind: str                        # HALVE_MICRO_BATCH or GRADIENT_CHECKPOINTING
    split: Split
    gradient_checkpointing: bool     # activation checkpointing on for the retry (and after)


def remedy_after_oom(split: Split, step: int, error: str, *, checkpointing: str, checkpointing_on: bool,
                     recorder: Recorder, log) -> OomRemedy:
    """The next rung of the memory ladder to redo ``step`` on; raises StopTraining (failed)
    when none is left. ``checkpointing`` is --gradient-checkpointing (auto, true, false);
    ``error`` the allocator's message.

    The caller has dropped the failed step's half-accumulated gradients and the exception
    (whose traceback holds the failed pass's activations), and freed the memory they held.
    """
    if split.micro_batch > 1:
        remedy = OomRemedy(HALVE_MICRO_BATCH, _halved(split), checkpointing_on)
        log(f"out of memory in step {step}: micro-batch {split.micro_batch} x {split.grad_accum} -> "
            f"{remedy.split.micro_batch} x {remedy.split.grad_accum} (the same {Batching.of(split).per_rank} "
            "sequences); redoing the step")
    elif checkpointing == "auto" and not checkpointing_on:
        remedy = OomRemedy(GRADIENT_CHECKPOINTING, split, True)
        log(f"out of memory in step {step} at micro-batch 1: turning on gradient checkpointing "
            "(activations recomputed in backward); redoing the step")
    else:
        raise StopTraining("failed", f"out of memory at micro-batch 1 in step {step}"
                           + (" with gradient checkpointing" if checkpointing_on else "")
                           + ": the model does not fit; use a smaller --block-size, --n-embd or --n-layer, "
                           + ("or --precision bf16/fp16" if checkpointing_on else
                              "--gradient-checkpointing auto, or --precision bf16/fp16"))
    recorder.log_event(EVENT_OOM, step, {
        "remedy": remedy.kind, "old_micro_batch": split.micro_batch, "old_grad_accum": split.grad_accum,
        "new_micro_batch": remedy.split.micro_batch, "new_grad_accum": remedy.split.grad_accum,
        "gradient_checkpointing": remedy.gradient_checkpointing, "error": error[:300]})
    return remedy


def oom_past_agreement(split: Split, step: int, rank: int, error: str, checkpointing_on: bool) -> RankLost:
    """Out of memory in the last backward pass of a data-parallel step: the other ranks are in
    its gradient all-reduce already, so the step cannot be redone by all of them in place. The
    run ends as a lost rank (torchrun stops the others; no collective is entered again), naming
    the flags that continue it with less memory, or that none are left."""
    where = (f"rank {rank} ran out of memory in the backward pass of step {step} "
             f"({(error.splitlines() or [''])[0][:200]}), after the other ranks began its gradient all-reduce")
    if split.micro_batch == 1 and checkpointing_on:
        return RankLost(f"{where}: at micro-batch 1 with gradient checkpointing the model does not fit; "
                        "use a smaller --block-size, --n-embd or --n-layer")
    fix = (f"--micro-batch {_halved(split).micro_batch} --grad-accum {_halved(split).grad_accum}"
           if split.micro_batch > 1 else "--gradient-checkpointing true")
    return RankLost(f"{where}, so it cannot be redone in place; continue the run from its last checkpoint "
                    f"with --resume auto {fix}")


def _halved(split: Split) -> Split:
    return Batching.of(split).halved().split


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
    reloaded.gradient_checkpointing = state.gradient_checkpointing   # the model keeps it on either way
    log(f"{state.nonfinite_streak} non-finite steps in a row up to step {streak_end}: {how}; "
        f"learning rate x{reloaded.lr_scale:g}")
    recorder.log_event(EVENT_NONFINITE, streak_end, {"action": "reload", "detail": how,
                                                     "lr_scale": reloaded.lr_scale})
    return reloaded

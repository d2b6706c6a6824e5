"""What every mirror shares: the run it mirrors, how it ends, the metric names, its failures.

A mirror copies a run into a tracker people already open (TensorBoard, W&B). It is never
the source of truth: expdb is. Its methods run on the mirror's own worker thread (see
``fanout``) or, for a replay, on the caller's; each may raise, and the caller switches
the mirror off with one warning instead of letting the exception reach training.
"""
from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Any, Mapping, Protocol

from trainer.files import finite_or_none as finite  # noqa: F401 - one home; re-exported
from trainer.recorder import RunInfo
from trainer.recorder import EVENT_MIRROR_FAILED, EVENT_MIRROR_LAGGED  # noqa: F401 - re-exported



class MirrorError(Exception):
    """A mirror cannot be used (raised by a replay, which has no training to protect)."""


@dataclass(frozen=True)
class MirrorRun:
    """The run a mirror opens: what the trainer said, plus what the database knows of it."""

    info: RunInfo
    run_id: int
    out_dir: str                       # where the mirror writes (tensorboard/, wandb/ below it)
    uid: str | None = None             # runs.uid: stable across sessions and merged databases
    resume_step: int | None = None     # a resume: steps after this one are logged again
    best_val_loss: float | None = None # the best before this session (a resume), else None
    best_step: int | None = None
    best_val_bpb: float | None = None  # val_bpb at best_step

    @property
    def resumed(self) -> bool:
        return self.resume_step is not None


@dataclass(frozen=True)
class RunEnd:
    """How the run ended, and the validation figures a summary or HParams view shows."""

    status: str
    reason: str | None = None
    best_val_loss: float | None = None
    best_step: int | None = None
    final_val_loss: float | None = None
    last_step: int | None = None
    best_val_bpb: float | None = None   # bits per byte at best_step (comparable across tokenizers)


@dataclass(frozen=True)
class CheckpointRef:
    """A checkpoint by reference: mirrors record where it is and what it holds, never its bytes."""

    path: str
    kind: str
    step: int
    val_loss: float | None
    size_bytes: int
    sha256: str


class Mirror(Protocol):
    """One tracker. ``name`` is the --report-to value that selects it."""

    name: str

    def open(self, run: MirrorRun) -> None: ...

    def step(self, step: int, metrics: Mapping[str, Any]) -> None: ...

    def eval(self, step: int, epoch: int, metrics: Mapping[str, Any]) -> None: ...

    def epoch(self, epoch: int, metrics: Mapping[str, Any]) -> None: ...

    def checkpoint(self, ref: CheckpointRef) -> None: ...

    def event(self, kind: str, step: int | None, detail: Mapping[str, Any]) -> None: ...

    def close(self, end: RunEnd) -> None: ...

    def abandon(self) -> None:
        """Release what a failed mirror holds; must not raise."""

    def fix_for(self, exc: BaseException) -> str:
        """What the user should do about ``exc``: the sentence a warning ends with."""


class BestTracker:
    """Best and latest validation loss, from the evaluations seen (NaN and inf never count),
    and the bits per byte of the best one."""

    def __init__(self, best: float | None = None, best_step: int | None = None, best_bpb: float | None = None):
        self.best, self.best_step, self.best_bpb = best, best_step, best_bpb
        self.final: float | None = None
        self.last_step: int | None = None

    def saw_step(self, step: int) -> None:
        self.last_step = step if self.last_step is None else max(step, self.last_step)

    def saw_eval(self, step: int, val_loss: Any, val_bpb: Any = None) -> None:
        value = finite(val_loss)
        self.final, self.last_step = value, max(step, self.last_step or step)
        if value is not None and (self.best is None or value < self.best):
            self.best, self.best_step, self.best_bpb = value, step, finite(val_bpb)

    def end(self, status: str, reason: str | None) -> RunEnd:
        return RunEnd(status, reason, self.best, self.best_step, self.final, self.last_step, self.best_bpb)


# -- metric names, shared so TensorBoard and W&B show the same tags ---------------------
def numbers(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numeric entries of ``metrics`` (bools and strings are not scalars to plot)."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def train_scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """train/loss, train/lr, train/grad_norm, train/tokens_per_s, ... (gpu0_util -> gpu/gpu0_util)."""
    return {(f"gpu/{k}" if k.startswith("gpu") else f"train/{k}"): v for k, v in numbers(metrics).items()}


def eval_scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """val/loss, val/ppl, val/bpb, val/word_ppl: the val_ prefix becomes the section."""
    return {f"val/{k.removeprefix('val_')}": v for k, v in numbers(metrics).items()}


def epoch_scalars(epoch: int, metrics: Mapping[str, Any]) -> dict[str, float]:
    values = {f"epoch/{k}": v for k, v in numbers(metrics).items() if k != "step"}
    values["epoch/epoch"] = float(epoch)
    return values


def epoch_step(epoch: int, metrics: Mapping[str, Any], fallback: int | None) -> int:
    """The optimizer step an epoch's summary is drawn at: both trackers purge and order by
    step, so an epoch summary at x=epoch would survive a resume's purge and be drawn twice."""
    step = metrics.get("step")
    return int(step) if step is not None else int(fallback if fallback is not None else epoch)


# -- fixes ------------------------------------------------------------------------------
def storage_fix(exc: BaseException, where: str) -> str | None:
    """The fix for a file-system error in ``where``, or None when ``exc`` is not one."""
    if not isinstance(exc, OSError):
        return None
    if exc.errno == errno.ENOSPC:
        return f"free disk space where {where} is written, or drop it from --report-to"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"make {where} writable (or point --out-dir at a writable folder), or drop it from --report-to"
    return f"check that {where} can be written, or drop it from --report-to"


def describe(exc: BaseException) -> str:
    text = str(exc).strip() or "(no message)"
    return f"{type(exc).__name__}: {text}"[:500]

"""What the trainer tells the outside world, and nothing more.

The trainer talks to a ``Recorder``; ``expdb`` implements it on a database, ``studies``
wraps it to report to Optuna. The trainer never imports either.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

# Kinds of log_event the trainer sends (expdb itself adds "resume" events on start_run).
EVENT_CHECKPOINT_DELETED = "checkpoint_deleted"    # {"path"}: a rotated-away checkpoint
EVENT_CHECKPOINT_FAILED = "checkpoint_failed"      # {"path", "error"}: a write failed; training went on
EVENT_RESUME_CHECKPOINT = "resume_checkpoint"      # {"path", "reason", "weights_only", "config_changes"}
EVENT_CORRUPT_CHECKPOINT = "corrupt_checkpoint"    # {"path", "problem"}: skipped by --resume auto
EVENT_SIGNAL = "signal"                            # {"signal", "checkpoint"}
EVENT_TIME_BUDGET = "time_budget"                  # {"limit_s", "remaining_s", "needed_s", "checkpoint"}
EVENT_OOM = "oom"                                  # {"remedy", "old_micro_batch", "new_micro_batch", ...}: recovered
EVENT_NONFINITE = "nonfinite"                      # {"loss", "grad_norm", "streak"} or {"action": "reload"}
EVENT_SCALER_SKIP = "scaler_skip"                  # {"scale", "total"}: fp16 overflow, skipped by the scaler
EVENT_EARLY_STOP = "early_stop"                    # {"best_step", "best_val_loss", "patience", "steps_saved", ...}
EVENT_LR_FIND = "lr_find"                          # {"suggested_lr", "rule", "plot", ...}: a finder's outcome

# Kinds expdb's mirrors add (expdb/mirrors): a tracker switched off, or one that could not keep up.
EVENT_MIRROR_FAILED = "mirror_failed"              # {"mirror", "error", "fix"}
EVENT_MIRROR_LAGGED = "mirror_lagged"              # {"mirror", "dropped", "unfinished"}

# The trackers a run can be mirrored to besides the experiment database (--report-to).
REPORT_TO_CHOICES = ("none", "tensorboard", "wandb")


@dataclass(frozen=True)
class RunInfo:
    """Everything known about a run before its first step."""

    name: str
    config: dict[str, Any]
    dataset: dict[str, Any]        # source, documents, bytes, sha256 of each split
    tokenizer: dict[str, Any]      # kind, name or path, vocab size, hash
    n_params: int
    device: str                    # e.g. "cpu", "cuda:0 (Tesla T4)"
    precision: str                 # resolved: fp32, bf16 or fp16
    host: str
    study_name: str | None = None
    trial_number: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Recorder(Protocol):
    """Receives a run's life. Methods must be cheap: they are called from the training loop."""

    def start_run(self, info: RunInfo) -> int:
        """Create (or continue) the run; return its id.

        With ``info.extra["run_id"]`` (a resume) the run continues that row; a recorder that
        has no such run raises LookupError, and the trainer then starts a new row.
        """

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        """Per-optimizer-step metrics: loss, lr, grad_norm, tokens_per_s, ..."""

    def log_eval(self, step: int, epoch: int, metrics: dict[str, float]) -> None:
        """A validation result: val_loss (nats per token), val_ppl, val_bpb (bits per byte of the
        evaluated text) and val_word_ppl (per word; NaN for a text without words). May raise
        trainer.errors.StopTraining."""

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """End-of-epoch summary: train_loss, val_loss, val_ppl, val_bpb, val_word_ppl, lr, epoch_seconds,
        tokens_per_s, mfu (model-FLOPs utilisation, trainer.flops; None where no peak was measured), memory, ..."""

    def log_checkpoint(self, path: str, kind: str, step: int, val_loss: float | None,
                       size_bytes: int, sha256: str) -> None:
        """A checkpoint was written (kind: periodic, best, emergency, final)."""

    def log_event(self, kind: str, step: int, detail: dict[str, Any]) -> None:
        """Something that happened: resume, oom, nonfinite, signal, corrupt_checkpoint..."""

    def finish(self, status: str, reason: str | None = None) -> None:
        """The run ended: completed, pruned, failed or interrupted."""


class NullRecorder:
    """Records nothing: for runs without a database and for tests of the loop alone."""

    def start_run(self, info: RunInfo) -> int:
        return 0

    def log_step(self, step: int, metrics: dict[str, float]) -> None: ...

    def log_eval(self, step: int, epoch: int, metrics: dict[str, float]) -> None: ...

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None: ...

    def log_checkpoint(self, path: str, kind: str, step: int, val_loss: float | None,
                       size_bytes: int, sha256: str) -> None: ...

    def log_event(self, kind: str, step: int, detail: dict[str, Any]) -> None: ...

    def finish(self, status: str, reason: str | None = None) -> None: ...

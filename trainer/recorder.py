"""What the trainer tells the outside world, and nothing more.

The trainer talks to a ``Recorder``; ``expdb`` implements it on a database, ``studies``
wraps it to report to Optuna. The trainer never imports either. Its command lines reach the
experiment database (--db) through the ``Database`` protocol, whose implementation is found
by name in the entry-point group ``smallgpt_lab.databases`` (``find_database``): expdb
registers itself there in pyproject.toml, as SQLAlchemy's dialects do.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import distributions
from pathlib import Path
from typing import Any, Callable, Protocol

from trainer.errors import ConfigError

DATABASES = "smallgpt_lab.databases"     # the entry-point group a database registers under
DEFAULT_DATABASE = "expdb"

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


class Database(Protocol):
    """What the trainer's command lines ask of the experiment database (--db): checks before any
    write, a recorder, the --continue-from merge and a session pack's snapshot. Errors come back
    as problem lines (one each, without the flag: the caller names it) or as ConfigError."""

    def problems(self, url: str | Path, *, create: bool, write: bool, shared: bool = False) -> list[str]:
        """What is wrong with recording into (``write``) or reading ``url``; [] when nothing."""

    def recorder(self, url: str, *, report_to: str = "none", out_dir: str | Path | None = None,
                 wandb_project: str | None = None, warn: Callable[[str], None] = print) -> Recorder:
        """A recorder on ``url`` (checked first with ``problems``), with the --report-to mirrors."""

    def mirror_warnings(self, report_to: str, out_dir: str | Path) -> list[str]:
        """Why a --report-to tracker would not work; warnings, never a stop."""

    def merge(self, sources: list[Path], into: str) -> list[str]:
        """Merge earlier sessions' databases into ``into``, idempotently; a summary line each."""

    def point_at_pack(self, snapshot: Path, out_dir: Path, held: dict[str, str]) -> None:
        """Rewrite a session pack's database snapshot to the pack's paths (trainer.pack)."""


@cache      # one lookup per process: a command asks for it at each check, merge and recorder
def find_database(name: str = DEFAULT_DATABASE) -> Database:
    """The installed database registered as ``name`` in the ``smallgpt_lab.databases`` group.
    Raises ConfigError naming --db and the fix when none is installed."""
    # Every distribution's entry points, not importlib's first per project name: a stale
    # smallgpt_lab.egg-info left in a checkout would otherwise hide the installed one's.
    found = [ep for dist in distributions() for ep in dist.entry_points if ep.group == DATABASES and ep.name == name]
    if not found:
        raise ConfigError([f"--db: no experiment database named {name!r} is installed (the entry-point group "
                           f"{DATABASES!r} has none): install the project with pip install -e . (or its wheel), "
                           "or pass --no-db"])
    return found[0].load()()

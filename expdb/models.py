"""The experiment database's tables (SQLAlchemy 2.x declarative).

These ORM classes stay inside expdb: callers get DataFrames or frozen records.

Schema choices:
- Optuna keeps its own tables (studies, trials, alembic_version, version_info, ...) in
  the same SQLite file, so no name here may collide with them; our schema version lives
  in ``expdb_schema_version``.
- Every table with a natural key has an explicit, named UniqueConstraint; its index leads
  with ``run_id`` (or ``study_name``) and so also serves lookups by that column.
- Non-finite floats: +inf and -inf are stored as they are (SQLite REAL and PostgreSQL
  double precision both hold them), but SQLite turns NaN into NULL. So NaN is stored as
  NULL and the column's name is listed in the row's ``nan_columns`` (comma-separated),
  which keeps "NaN" apart from "not reported" (see docs/schema.md).
- Times are naive UTC datetimes, so SQLite and PostgreSQL store the same thing.
- JSON (config, dataset, tokenizer, detail) is stored as text, readable from any SQL tool.
- ``runs.uid`` (a uuid4 hex) names a run across files: ``merge`` recognises a run it
  has already copied by it, since ids are only unique within one database.
- ``step_metrics`` is the one big table (a row per optimizer step): its primary key is
  (run_id, step) and on SQLite it is a WITHOUT ROWID table, so a run's steps lie
  together in key order (range reads are sequential) and no second index is kept.
- ``step_rollups`` summarises every ROLLUP_BLOCK consecutive steps of a run (min and max
  of each metric and the steps where they occur); the writer keeps it in step with
  ``step_metrics`` in the same transaction, so ``step_series`` can reduce a
  million-step run without reading a million rows.
- ``epoch_metrics.gpu_*`` (version 3) are nullable: a CPU run, or one without NVML, has none,
  and adding nullable columns upgrades a table in place on both backends (no rebuild).
- ``val_bpb``, ``val_word_ppl`` (eval and epoch rows), ``epoch_metrics.mfu`` and
  ``runs.best_val_bpb`` (version 4) are nullable for the same reason: rows written before
  version 4 keep NULL, since the bytes of the text they evaluated were never counted.
"""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import (BigInteger, Boolean, CheckConstraint, DateTime, Float, ForeignKey, Index,
                        Integer, String, Text, UniqueConstraint)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Bump when a table or view changes, and teach expdb.migrations to upgrade the older version.
SCHEMA_VERSION = 4
VERSION_TABLE = "expdb_schema_version"

RUN_STATUSES = ("running", "completed", "pruned", "failed", "interrupted")
ROLLUP_BLOCK = 64                   # steps per step_rollups row: block = step // ROLLUP_BLOCK
ROLLUP_METRICS = ("loss", "lr", "grad_norm", "tokens_per_s")


class Base(DeclarativeBase):
    pass


def _run_fk() -> Mapped[int]:
    # Deleting a run deletes its history; on SQLite only with PRAGMA foreign_keys=ON,
    # which the engine sets on every connection.
    return mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), nullable=False)


def _nan_columns() -> Mapped[str | None]:
    return mapped_column(String, nullable=True)


class Run(Base):
    __tablename__ = "runs"
    __table_args__ = (
        # NULLs never collide, so runs outside a study are not constrained.
        UniqueConstraint("study_name", "trial_number", name="uq_runs_study_trial"),
        UniqueConstraint("uid", name="uq_runs_uid"),
        CheckConstraint("status IN (%s)" % ", ".join(f"'{s}'" for s in RUN_STATUSES),
                        name="ck_runs_status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    uid: Mapped[str] = mapped_column(String(32), nullable=False)   # uuid4 hex, unique across files
    name: Mapped[str] = mapped_column(String, nullable=False)
    status: Mapped[str] = mapped_column(String, nullable=False, default="running")
    status_reason: Mapped[str | None] = mapped_column(Text)
    study_name: Mapped[str | None] = mapped_column(String)
    trial_number: Mapped[int | None] = mapped_column(Integer)
    config: Mapped[str] = mapped_column(Text, nullable=False)       # JSON object
    dataset: Mapped[str] = mapped_column(Text, nullable=False)      # JSON object
    tokenizer: Mapped[str] = mapped_column(Text, nullable=False)    # JSON object
    n_params: Mapped[int | None] = mapped_column(BigInteger)
    device: Mapped[str | None] = mapped_column(String)
    precision: Mapped[str | None] = mapped_column(String)
    host: Mapped[str | None] = mapped_column(String)
    out_dir: Mapped[str | None] = mapped_column(Text)               # config["out_dir"]
    started_at: Mapped[datetime] = mapped_column(DateTime, nullable=False)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime)
    # Touched by every flush of the buffered writer: a "running" run whose updated_at is
    # old has most likely died without calling finish().
    updated_at: Mapped[datetime] = mapped_column(DateTime, nullable=False)
    resume_count: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    best_val_loss: Mapped[float | None] = mapped_column(Float)      # lowest val_loss logged
    best_step: Mapped[int | None] = mapped_column(Integer)          # the step of that val_loss
    best_val_bpb: Mapped[float | None] = mapped_column(Float)       # val_bpb at that step


class StepMetric(Base):
    __tablename__ = "step_metrics"
    # The key is the natural one, (run_id, step): no surrogate id, no extra unique index.
    __table_args__ = ({"sqlite_with_rowid": False},)

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    epoch: Mapped[int | None] = mapped_column(Integer)
    loss: Mapped[float | None] = mapped_column(Float)
    lr: Mapped[float | None] = mapped_column(Float)
    grad_norm: Mapped[float | None] = mapped_column(Float)
    tokens_per_s: Mapped[float | None] = mapped_column(Float)
    tokens_seen: Mapped[int | None] = mapped_column(BigInteger)
    nan_columns: Mapped[str | None] = _nan_columns()


class EvalMetric(Base):
    __tablename__ = "eval_metrics"
    __table_args__ = (UniqueConstraint("run_id", "step", name="uq_eval_metrics_run_step"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = _run_fk()
    step: Mapped[int] = mapped_column(Integer, nullable=False)
    epoch: Mapped[int | None] = mapped_column(Integer)
    val_loss: Mapped[float | None] = mapped_column(Float)
    val_ppl: Mapped[float | None] = mapped_column(Float)
    # Bits per byte of the evaluated text (comparable across tokenizers) and perplexity per
    # word (NaN, so NULL, when the text has no words): trainer.data.text_measure.
    val_bpb: Mapped[float | None] = mapped_column(Float)
    val_word_ppl: Mapped[float | None] = mapped_column(Float)
    nan_columns: Mapped[str | None] = _nan_columns()


class EpochMetric(Base):
    __tablename__ = "epoch_metrics"
    __table_args__ = (UniqueConstraint("run_id", "epoch", name="uq_epoch_metrics_run_epoch"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = _run_fk()
    epoch: Mapped[int] = mapped_column(Integer, nullable=False)
    step: Mapped[int | None] = mapped_column(Integer)     # the last optimizer step of the epoch
    train_loss: Mapped[float | None] = mapped_column(Float)
    val_loss: Mapped[float | None] = mapped_column(Float)
    val_ppl: Mapped[float | None] = mapped_column(Float)
    val_bpb: Mapped[float | None] = mapped_column(Float)
    val_word_ppl: Mapped[float | None] = mapped_column(Float)
    lr: Mapped[float | None] = mapped_column(Float)
    grad_norm: Mapped[float | None] = mapped_column(Float)
    epoch_seconds: Mapped[float | None] = mapped_column(Float)
    tokens_per_s: Mapped[float | None] = mapped_column(Float)
    mem_process_mb: Mapped[float | None] = mapped_column(Float)
    mem_gpu_allocated_mb: Mapped[float | None] = mapped_column(Float)
    mem_gpu_reserved_mb: Mapped[float | None] = mapped_column(Float)
    mem_gpu_peak_mb: Mapped[float | None] = mapped_column(Float)
    # The GPUs the run trains on (under torchrun those of rank 0's machine), read through NVML
    # every few seconds by a thread of their own (trainer.gpu_monitor) and aggregated over the
    # epoch's samples. NULL on a CPU, without nvidia-ml-py, or when no sample fell in the epoch.
    gpu_util_pct: Mapped[float | None] = mapped_column(Float)       # each GPU's mean, averaged over GPUs
    gpu_util_max_pct: Mapped[float | None] = mapped_column(Float)   # highest sample of any GPU
    # As nvidia-smi shows it: every process on the GPU, not only torch's allocations (mem_gpu_*).
    gpu_mem_used_mb: Mapped[float | None] = mapped_column(Float)    # highest sample of any GPU
    gpu_temp_c: Mapped[float | None] = mapped_column(Float)         # highest sample of any GPU
    gpu_power_w: Mapped[float | None] = mapped_column(Float)        # the GPUs' mean powers, summed
    # Model-FLOPs utilisation over the epoch (trainer.flops), normally in (0, 1]; NULL where no peak was measured.
    mfu: Mapped[float | None] = mapped_column(Float)
    recorded_at: Mapped[datetime] = mapped_column(DateTime, nullable=False)
    nan_columns: Mapped[str | None] = _nan_columns()


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    # No natural key: the same path is rewritten (e.g. "best.pt") at several steps.
    __table_args__ = (Index("ix_checkpoints_run_id", "run_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = _run_fk()
    path: Mapped[str] = mapped_column(Text, nullable=False)
    kind: Mapped[str] = mapped_column(String, nullable=False)   # periodic, best, emergency, final
    step: Mapped[int | None] = mapped_column(Integer)
    val_loss: Mapped[float | None] = mapped_column(Float)
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    sha256: Mapped[str | None] = mapped_column(String)
    created_at: Mapped[datetime] = mapped_column(DateTime, nullable=False)
    # Set when the file is rotated away; the row stays as history.
    deleted: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    nan_columns: Mapped[str | None] = _nan_columns()


class Event(Base):
    __tablename__ = "events"
    __table_args__ = (Index("ix_events_run_id", "run_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = _run_fk()
    kind: Mapped[str] = mapped_column(String, nullable=False)   # resume, oom, nonfinite, signal, ...
    step: Mapped[int | None] = mapped_column(Integer)
    detail: Mapped[str] = mapped_column(Text, nullable=False)   # JSON object
    created_at: Mapped[datetime] = mapped_column(DateTime, nullable=False)


class StepRollup(Base):
    """Derived from step_metrics: one row per ROLLUP_BLOCK steps of a run (see expdb._write.rollups)."""

    __tablename__ = "step_rollups"
    __table_args__ = ({"sqlite_with_rowid": False},)

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    block: Mapped[int] = mapped_column(Integer, primary_key=True)   # step // ROLLUP_BLOCK
    n_rows: Mapped[int] = mapped_column(Integer, nullable=False)
    first_step: Mapped[int] = mapped_column(Integer, nullable=False)
    last_step: Mapped[int] = mapped_column(Integer, nullable=False)
    nan_step: Mapped[int | None] = mapped_column(Integer)    # first step with a NaN metric
    # For each of ROLLUP_METRICS: <m>_min, <m>_min_step, <m>_max, <m>_max_step (added below).


for _metric in ROLLUP_METRICS:
    for _end in ("min", "max"):
        setattr(StepRollup, f"{_metric}_{_end}", mapped_column(Float))
        setattr(StepRollup, f"{_metric}_{_end}_step", mapped_column(Integer))


class SchemaVersion(Base):
    """One row: the schema version this database was created with or upgraded to."""

    __tablename__ = VERSION_TABLE

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    applied_at: Mapped[datetime] = mapped_column(DateTime, nullable=False)


# The tables whose float columns follow the NaN convention, and those columns.
FLOAT_COLUMNS = {
    model: tuple(c.name for c in model.__table__.columns
                 if isinstance(c.type, Float) and c.name != "id")
    for model in (StepMetric, EvalMetric, EpochMetric, Checkpoint)
}
ROLLUP_COLUMNS = tuple(c.name for c in StepRollup.__table__.columns)

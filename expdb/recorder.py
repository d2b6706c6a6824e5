"""DBRecorder: ``trainer.recorder.Recorder`` on an experiment database.

Step and eval rows go through the buffered writer and never wait for the database.
Epoch ends, checkpoints and events are flushed at once: they are rare and they are
what a crashed run's history must not lose. A database problem never stops training:
those flushes log and keep the rows; ``finish`` raises WriteError if rows are still
unwritten at the end.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from expdb import runs as run_rows
from expdb.errors import (ConflictError, DuplicateRunError, ExpdbError, InvalidValueError,
                          RecorderStateError)
from expdb.models import (FLOAT_COLUMNS, RUN_STATUSES, Checkpoint, EpochMetric, EvalMetric, Event,
                          StepMetric)
from expdb.values import as_float, as_int, encode_nan, to_json, utcnow
from expdb.writer import BufferedWriter
from trainer.recorder import RunInfo

if TYPE_CHECKING:
    from expdb.db import ExperimentDB

log = logging.getLogger("expdb")

# log_event kind by which the trainer reports a rotated checkpoint (detail: {"path": ...}).
CHECKPOINT_DELETED = "checkpoint_deleted"


def _metric_row(model: type, metrics: dict[str, Any], **fixed: Any) -> dict[str, Any]:
    """A row of ``model``: the fixed columns plus every float column from ``metrics``.
    Metric names the table has no column for are ignored."""
    row = dict(fixed)
    for column in FLOAT_COLUMNS[model]:
        row.setdefault(column, as_float(metrics.get(column)))
    return encode_nan(row, FLOAT_COLUMNS[model])


class DBRecorder:
    """Records one run. Create it with ``ExperimentDB.recorder()``; ``run_id`` is set by start_run."""

    def __init__(self, db: "ExperimentDB", study_name: str | None = None,
                 trial_number: int | None = None, *, flush_interval_s: float = 0.5,
                 batch_rows: int = 1000, finish_timeout_s: float = 60.0):
        self._db = db
        self._study_name = study_name
        self._trial_number = trial_number
        self._writer_options = dict(interval_s=flush_interval_s, batch_rows=batch_rows)
        self._finish_timeout_s = finish_timeout_s
        self._writer: BufferedWriter | None = None
        self._finished = False
        self._best: float | None = None
        self.run_id: int | None = None

    # -- Recorder ------------------------------------------------------------------------
    def start_run(self, info: RunInfo) -> int:
        if self._writer is not None:
            raise RecorderStateError("start_run was already called on this recorder; "
                                     "get a new one from db.recorder() for another run")
        if info.extra.get("run_id") is not None:
            run_id = self._resume(info, int(info.extra["run_id"]), int(info.extra.get("resume_step", -1)))
        else:
            run_id = self._insert(info)
        self.run_id = run_id
        self._writer = BufferedWriter(self._db._sessions, run_id, self._db.where, **self._writer_options)
        return run_id

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        self._open_writer().add(StepMetric, _metric_row(
            StepMetric, metrics, run_id=self.run_id, step=int(step), epoch=as_int(metrics.get("epoch")),
            tokens_seen=as_int(metrics.get("tokens_seen"))))

    def log_eval(self, step: int, epoch: int, metrics: dict[str, float]) -> None:
        writer = self._open_writer()
        row = _metric_row(EvalMetric, metrics, run_id=self.run_id, step=int(step), epoch=as_int(epoch))
        writer.add(EvalMetric, row)
        val_loss = row["val_loss"]          # None for a missing or NaN loss: never "best"
        if val_loss is not None and (self._best is None or val_loss < self._best):
            self._best = val_loss
            writer.set_run_fields(best_val_loss=val_loss, best_step=int(step))

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        self._open_writer().add(EpochMetric, _metric_row(
            EpochMetric, metrics, run_id=self.run_id, epoch=int(epoch),
            step=as_int(metrics.get("step")), recorded_at=utcnow()))
        self._flush_now()

    def log_checkpoint(self, path: str, kind: str, step: int, val_loss: float | None,
                       size_bytes: int, sha256: str) -> None:
        self._open_writer().add(Checkpoint, _metric_row(
            Checkpoint, {"val_loss": val_loss}, run_id=self.run_id, path=str(path), kind=kind,
            step=as_int(step), size_bytes=as_int(size_bytes), sha256=sha256,
            created_at=utcnow(), deleted=False))
        self._flush_now()

    def log_event(self, kind: str, step: int, detail: dict[str, Any]) -> None:
        self._open_writer().add(Event, dict(run_id=self.run_id, kind=kind, step=as_int(step),
                                            detail=to_json(detail), created_at=utcnow()))
        self._flush_now()
        if kind == CHECKPOINT_DELETED and isinstance(detail, dict) and detail.get("path"):
            self._mark_deleted(str(detail["path"]))

    def finish(self, status: str, reason: str | None = None) -> None:
        if status not in RUN_STATUSES:
            raise InvalidValueError(f"run status {status!r} is not one of {', '.join(RUN_STATUSES)}")
        writer = self._started_writer()
        # Through the writer, so the last rows and the final status commit together.
        writer.set_run_fields(status=status, status_reason=reason, ended_at=utcnow())
        self._finished = True
        writer.close(self._finish_timeout_s)

    # -- helpers -------------------------------------------------------------------------
    def _insert(self, info: RunInfo) -> int:
        # RunInfo's own study fields win: the trainer knows best which trial it runs.
        study = info.study_name if info.study_name is not None else self._study_name
        trial = info.trial_number if info.trial_number is not None else self._trial_number
        try:
            with self._db._write_session() as session:
                return run_rows.insert_run(session, info, study, trial)
        except ConflictError as exc:
            if study is None or trial is None:
                raise
            with self._db._write_session() as session:
                existing = run_rows.find_trial_run(session, study, trial)
            raise DuplicateRunError(
                f"study {study!r} trial {trial} already has run {existing}; resume it with "
                f"RunInfo.extra['run_id']={existing} or use another trial number") from exc

    def _resume(self, info: RunInfo, run_id: int, resume_step: int) -> int:
        with self._db._write_session() as session:
            self._best, _ = run_rows.resume_run(session, run_id, info, resume_step)
        return run_id

    def _started_writer(self) -> BufferedWriter:
        if self._writer is None:
            raise RecorderStateError("call start_run before logging to a DBRecorder")
        return self._writer

    def _open_writer(self) -> BufferedWriter:
        if self._finished:
            raise RecorderStateError(f"run {self.run_id} is finished; nothing more can be logged")
        return self._started_writer()

    def _flush_now(self) -> None:
        try:
            if not self._open_writer().flush():
                log.warning("expdb: run %s: database busy, %d rows kept for the writer thread",
                            self.run_id, self._open_writer().pending)
        except ExpdbError as exc:
            log.error("expdb: run %s: %s", self.run_id, exc)

    def _mark_deleted(self, path: str) -> None:
        try:
            with self._db._write_session() as session:
                run_rows.mark_checkpoint_deleted(session, self.run_id, path)
        except ExpdbError as exc:
            log.error("expdb: run %s: could not flag checkpoint %s as deleted: %s", self.run_id, path, exc)

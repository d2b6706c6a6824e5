"""DBRecorder: ``trainer.recorder.Recorder`` on an experiment database.

Every row goes through the buffered writer; the training thread never runs SQL after
``start_run``. Epoch ends, checkpoints and events also ask the writer to flush and wait
for it up to ``sync_timeout_s`` (0.25 s): they are rare and they are what a crashed
run's history must not lose, but a database locked by another process must not hold
up training, so after that moment the rows stay buffered and are written when the
lock goes (or the full disk has space again). A database problem never stops training;
rows still unwritten when ``finish``'s retries run out are counted in ``unwritten_rows``
and named in one error line with the fix.
"""
from __future__ import annotations

import logging
from typing import Any

from expdb import paths
from expdb._write import runs as run_rows
from expdb._write.rows import CHECKPOINT, EPOCH, EVAL, EVENT, STEP, encode_step
from expdb._write.writer import BufferedWriter
from expdb.engine import WriteAccess
from expdb.errors import ConflictError, DuplicateRunError, InvalidValueError, RecorderStateError
from expdb.models import RUN_STATUSES
from expdb.values import as_int, to_json, utcnow
from trainer.recorder import RunInfo

log = logging.getLogger("expdb")

# log_event kind by which the trainer reports a rotated checkpoint (detail: {"path": ...}).
CHECKPOINT_DELETED = "checkpoint_deleted"
_VAL_LOSS = EVAL.columns.index("val_loss")
_VAL_BPB = EVAL.columns.index("val_bpb")


class DBRecorder:
    """Records one run. Create it with ``ExperimentDB.recorder()``; ``run_id`` is set by start_run.

    ``access`` is what it writes with (the database's writer engine and sessions): the
    recorder never sees the ExperimentDB itself.
    """

    def __init__(self, access: WriteAccess, study_name: str | None = None,
                 trial_number: int | None = None, *, flush_interval_s: float = 0.5,
                 batch_rows: int = 5000, sync_timeout_s: float = 0.25, finish_timeout_s: float = 60.0):
        self._access = access
        # Checkpoint and run paths are stored relative to the database's folder (expdb.paths).
        self._root = paths.root_of(str(access.engine.url))
        self._study_name = study_name
        self._trial_number = trial_number
        self._writer_options = dict(interval_s=flush_interval_s, batch_rows=batch_rows)
        self._sync_timeout_s = sync_timeout_s
        self._finish_timeout_s = finish_timeout_s
        self._writer: BufferedWriter | None = None
        self._steps = None          # the writer's buffer of step rows, while the run is open
        self._finished = False
        self._best: float | None = None
        self.run_id: int | None = None
        self.unwritten_rows = 0     # set by finish: rows the database never took (a full disk, a lock)

    # -- Recorder ------------------------------------------------------------------------
    def start_run(self, info: RunInfo) -> int:
        if self._writer is not None:
            raise RecorderStateError("start_run was already called on this recorder; "
                                     "get a new one from db.recorder() for another run")
        run_id = self._continued(info)
        if run_id is None:
            run_id = self._insert(info)
        self.run_id = run_id
        self._writer = BufferedWriter(self._access.engine, run_id, self._access.where, **self._writer_options)
        self._steps = self._writer.queue(STEP)
        return run_id

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        # The hot path (once per optimizer step): a tuple appended to a deque, ~2 us.
        steps = self._steps
        if steps is None:
            self._open_writer()                 # raises the right RecorderStateError
        steps.append(encode_step(self.run_id, step, metrics))
        if len(steps) >= self._writer.batch_rows:
            self._writer.wake()

    def log_eval(self, step: int, epoch: int, metrics: dict[str, float]) -> None:
        writer = self._open_writer()
        row = EVAL.encode((self.run_id, int(step), as_int(epoch)), metrics)
        writer.add(EVAL, row)
        val_loss = row[_VAL_LOSS]           # None for a missing or NaN loss: never "best"
        if val_loss is not None and (self._best is None or val_loss < self._best):
            self._best = val_loss
            # The bpb of the best-loss step (None when not reported): the run's bpb, as loss is its loss.
            writer.set_run_fields(best_val_loss=val_loss, best_step=int(step), best_val_bpb=row[_VAL_BPB])

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        self._open_writer().add(EPOCH, EPOCH.encode(
            (self.run_id, int(epoch), as_int(metrics.get("step")), utcnow()), metrics))
        self._flush_now()

    def log_checkpoint(self, path: str, kind: str, step: int, val_loss: float | None,
                       size_bytes: int, sha256: str) -> None:
        self._open_writer().add(CHECKPOINT, CHECKPOINT.encode(
            (self.run_id, paths.portable(path, self._root), kind, as_int(step), as_int(size_bytes), sha256, utcnow(), False),
            {"val_loss": val_loss}))
        self._flush_now()

    def log_event(self, kind: str, step: int, detail: dict[str, Any]) -> None:
        self._open_writer().add(EVENT, EVENT.encode(
            (self.run_id, kind, as_int(step), to_json(detail), utcnow()), {}))
        if kind == CHECKPOINT_DELETED and isinstance(detail, dict) and detail.get("path"):
            run_id, path = self.run_id, paths.portable(detail["path"], self._root)
            self._writer.add_call(lambda conn: run_rows.mark_checkpoint_deleted(conn, run_id, path))
        self._flush_now()

    def finish(self, status: str, reason: str | None = None) -> None:
        if status not in RUN_STATUSES:
            raise InvalidValueError(f"run status {status!r} is not one of {', '.join(RUN_STATUSES)}")
        writer = self._started_writer()
        # Through the writer, so the last rows and the final status commit together.
        writer.set_run_fields(status=status, status_reason=reason, ended_at=utcnow())
        self._finished, self._steps = True, None
        self.unwritten_rows = writer.close(self._finish_timeout_s)

    @property
    def writer_cpu_s(self) -> float:
        """CPU seconds the background writer has spent on this run's rows so far: with the
        time of the calls themselves, what recording costs a training process."""
        return self._writer.cpu_s if self._writer is not None else 0.0

    # -- helpers -------------------------------------------------------------------------
    def _insert(self, info: RunInfo) -> int:
        # RunInfo's own study fields win: the trainer knows best which trial it runs.
        study = info.study_name if info.study_name is not None else self._study_name
        trial = info.trial_number if info.trial_number is not None else self._trial_number
        try:
            with self._access.session() as session:
                return run_rows.insert_run(session, info, study, trial, self._root)
        except ConflictError as exc:
            if study is None or trial is None:
                raise
            with self._access.session() as session:
                existing = run_rows.find_trial_run(session, study, trial)
            raise DuplicateRunError(
                f"study {study!r} trial {trial} already has run {existing}; resume it with "
                f"RunInfo.extra['run_id']={existing} or use another trial number") from exc

    def _continued(self, info: RunInfo) -> int | None:
        """The row a resume continues, once continued; None for a new run.

        A checkpoint's run uid names its row in any database (a moved folder, a pack, a merged
        file): found, that row goes on; not found, the run is new here and keeps the uid. Older
        checkpoints name a run id alone, which only the database they were taken against knows.
        """
        uid, extra = info.extra.get("run_uid"), info.extra
        if uid is not None:
            if "resume_step" not in extra:
                return None
            with self._access.session() as session:
                found = run_rows.find_run_by_uid(session, uid)
            if found is None:
                return None
            return self._resume(info, found, int(extra["resume_step"]), by_uid=True)
        if extra.get("run_id") is not None:
            return self._resume(info, int(extra["run_id"]), int(extra.get("resume_step", -1)))
        return None

    def _resume(self, info: RunInfo, run_id: int, resume_step: int, by_uid: bool = False) -> int:
        with self._access.session() as session:
            self._best, _ = run_rows.resume_run(session, run_id, info, resume_step, self._root, by_uid=by_uid)
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
        writer = self._open_writer()
        if not writer.flush(self._sync_timeout_s) and writer.last_error is not None:
            log.warning("expdb: run %s: %s; %d rows kept for the writer thread",
                        self.run_id, writer.last_error, writer.pending)

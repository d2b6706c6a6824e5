"""The buffered background writer: the training thread appends, a daemon thread writes.

``add`` only appends to a list under a lock held for microseconds, so a locked or slow
database never stalls a training step. The thread writes everything buffered every
``interval_s`` (or sooner once ``batch_rows`` are waiting) in one transaction, one
executemany per table. When the database stays locked past the busy timeout (another
process holds the write lock), the rows go back to the front of the buffer and are
retried with a growing delay: nothing is dropped. ``flush`` writes synchronously, for
moments worth a durable record (epoch ends, checkpoints, events, finish).
"""
from __future__ import annotations

import atexit
import logging
import threading
import time
from typing import Any

from sqlalchemy import delete, insert, update
from sqlalchemy.orm import Session, sessionmaker

from expdb.engine import session_scope
from expdb.errors import ConflictError, ExpdbError, WriteError
from expdb.models import EpochMetric, EvalMetric, Run, StepMetric
from expdb.values import utcnow

log = logging.getLogger("expdb")

# The column that, with run_id, identifies a row: used only when a batch conflicts.
_NATURAL_KEY = {StepMetric: "step", EvalMetric: "step", EpochMetric: "epoch"}
_MAX_RETRY_DELAY_S = 5.0
_DELETE_CHUNK = 500     # keeps IN lists far below SQLite's bound-parameter limit


class BufferedWriter:
    """Rows for one run: in memory at once, in the database within about ``interval_s``."""

    def __init__(self, sessions: sessionmaker, run_id: int, where: str, *,
                 interval_s: float = 0.5, batch_rows: int = 1000):
        self.run_id = run_id
        self._sessions = sessions
        self._where = where
        self._interval_s = interval_s
        self._batch_rows = batch_rows
        self._lock = threading.Lock()           # guards the two buffers below; held briefly
        self._write_lock = threading.Lock()     # one write at a time, so rows keep their order
        self._pending: list[tuple[type, dict[str, Any]]] = []
        self._run_fields: dict[str, Any] = {}   # columns of the runs row to set on next write
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.last_error: ExpdbError | None = None
        self._thread = threading.Thread(target=self._loop, name=f"expdb-writer-run{run_id}",
                                        daemon=True)
        self._thread.start()
        # A daemon thread dies with the interpreter: write what is left on a normal exit.
        atexit.register(self._flush_at_exit)

    # -- called from the training thread ------------------------------------------------
    def add(self, model: type, row: dict[str, Any]) -> None:
        with self._lock:
            self._pending.append((model, row))
            full = len(self._pending) >= self._batch_rows
        if full:
            self._wake.set()

    def set_run_fields(self, **fields: Any) -> None:
        with self._lock:
            self._run_fields.update(fields)

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def flush(self, timeout_s: float = 0.0) -> bool:
        """Write all buffered rows now; keep retrying a locked database for ``timeout_s``.

        Returns False when rows remain (still buffered, retried by the thread). Raises
        WriteError when the rows break a constraint even after replacing duplicates
        (e.g. their run was deleted): retrying cannot help.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self._write_pending()
                return True
            except ConflictError as exc:
                raise WriteError(f"{self.pending} buffered rows of run {self.run_id} cannot be "
                                 f"written to {self._where}: {exc}") from exc
            except ExpdbError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))

    def close(self, timeout_s: float = 60.0) -> None:
        """Stop the thread and write everything; WriteError if rows are left over."""
        self._stop.set()
        self._wake.set()
        self._thread.join()
        atexit.unregister(self._flush_at_exit)
        if not self.flush(timeout_s):
            raise WriteError(f"{self.pending} rows of run {self.run_id} could not be written to "
                             f"{self._where} within {timeout_s:.0f} s: {self.last_error}")

    # -- the daemon thread -----------------------------------------------------------------
    def _loop(self) -> None:
        delay = self._interval_s
        while not self._stop.is_set():
            self._wake.wait(delay)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self._write_pending()
                delay = self._interval_s
            except Exception:   # noqa: BLE001 - the thread must outlive any single failure
                # Already logged by _write_pending; back off so a long lock is not hammered.
                delay = min(delay * 2, _MAX_RETRY_DELAY_S)

    def _flush_at_exit(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)
        try:
            if not self.flush(timeout_s=10):
                log.error("expdb: %d rows of run %d were not written at exit: %s",
                          self.pending, self.run_id, self.last_error)
        except ExpdbError as exc:
            log.error("expdb: rows of run %d were not written at exit: %s", self.run_id, exc)

    # -- writing -------------------------------------------------------------------------
    def _write_pending(self) -> None:
        with self._write_lock:
            with self._lock:
                batch, self._pending = self._pending, []
                fields, self._run_fields = self._run_fields, {}
            if not batch and not fields:
                return
            try:
                self._write(batch, fields)
            except BaseException as exc:
                self._put_back(batch, fields)
                self._note_failure(exc)
                raise
            if self.last_error is not None:
                log.warning("expdb: writing to %s works again", self._where)
                self.last_error = None

    def _put_back(self, batch: list, fields: dict[str, Any]) -> None:
        with self._lock:
            self._pending[:0] = batch
            fields.update(self._run_fields)     # values set meanwhile are newer
            self._run_fields = fields

    def _note_failure(self, exc: BaseException) -> None:
        if isinstance(exc, ExpdbError):
            if self.last_error is None:         # log once per failing streak, not every retry
                log.warning("expdb: %s; %d rows kept in memory", exc, self.pending)
            self.last_error = exc
        else:
            log.exception("expdb: unexpected error while writing run %d", self.run_id)

    def _write(self, batch: list, fields: dict[str, Any]) -> None:
        grouped: dict[type, list[dict[str, Any]]] = {}
        for model, row in batch:
            grouped.setdefault(model, []).append(row)
        try:
            with session_scope(self._sessions, self._where) as session:
                self._insert(session, grouped, fields, replace=False)
        except ConflictError:
            # A key already exists, e.g. a step logged again after an in-process retry:
            # the later value wins. Only this slow path pays for the deletes.
            with session_scope(self._sessions, self._where) as session:
                self._insert(session, grouped, fields, replace=True)

    def _insert(self, session: Session, grouped: dict, fields: dict[str, Any], replace: bool) -> None:
        for model, rows in grouped.items():
            if replace and model in _NATURAL_KEY:
                rows = self._delete_existing(session, model, rows)
            session.execute(insert(model.__table__), rows)      # one executemany per table
        runs = Run.__table__
        session.execute(update(runs).where(runs.c.id == self.run_id)
                        .values(updated_at=utcnow(), **fields))

    def _delete_existing(self, session: Session, model: type, rows: list[dict]) -> list[dict]:
        key = _NATURAL_KEY[model]
        last = {row[key]: row for row in rows}      # every row is this run's; later ones win
        keys = list(last)
        table = model.__table__
        for i in range(0, len(keys), _DELETE_CHUNK):
            session.execute(delete(table).where(table.c.run_id == self.run_id,
                                                table.c[key].in_(keys[i:i + _DELETE_CHUNK])))
        return list(last.values())

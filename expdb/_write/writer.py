"""The buffered background writer: the training thread appends, a daemon thread writes.

``add`` appends a tuple to a deque (thread-safe, no lock) and returns, so a locked or
slow database never stalls a training step: every SQL statement of a run's rows runs
in the writer thread. It writes everything buffered every ``interval_s`` (or sooner
once ``batch_rows`` are waiting, or when asked by ``flush``) in one transaction: one
DBAPI executemany of plain tuples per table, the step rollups, and the run's
``updated_at``. When the transaction fails (another process held the lock past the
busy timeout, the server went away) the rows go back to the front of the buffer and
are retried with a growing delay: nothing is dropped. A full disk is such a failure: the
rows wait in memory until space is freed; if the run ends first, ``close`` retries for
its timeout and then says in one line how many rows are unwritten and the fix.

``flush(timeout_s)`` asks the thread to write now and waits at most ``timeout_s`` for
it: epoch ends and checkpoints wait a moment for a durable record, but never for a
database that another process keeps locked.
"""
from __future__ import annotations

import atexit
import logging
import threading
import time
from collections import deque
from typing import Any, Callable

from sqlalchemy import Connection, Engine, update

from expdb._write.rollups import RollupTracker
from expdb._write.rows import STEP, RowSpec
from expdb.engine import translated
from expdb.errors import ConflictError, ExpdbError, WriteError
from expdb.models import Run
from expdb.values import utcnow

log = logging.getLogger("expdb")

_MAX_RETRY_DELAY_S = 5.0


class BufferedWriter:
    """Rows of one run: in memory at once, in the database within about ``interval_s``."""

    def __init__(self, engine: Engine, run_id: int, where: str, *, interval_s: float = 0.5,
                 batch_rows: int = 5000):
        self.run_id = run_id
        self._engine, self._where = engine, where
        self._interval_s = interval_s
        self.batch_rows = self._batch_rows = batch_rows
        self._queues: dict[RowSpec, deque] = {}
        self._calls: deque[Callable[[Connection], Any]] = deque()    # run after the inserts
        self._run_fields: dict[str, Any] = {}   # columns of the runs row to set on the next write
        self._fields_lock = threading.Lock()
        self._rollups = RollupTracker(run_id)
        self._wake, self._stop = threading.Event(), threading.Event()
        self._done = threading.Condition()
        self._requested = self._written = 0     # flush requests asked / served
        self._deadline = float("inf")           # when close() gives up retrying
        self.last_error: ExpdbError | None = None
        self.cpu_s = 0.0                        # CPU time the thread has spent writing (a cost gauge)
        self._thread = threading.Thread(target=self._loop, name=f"expdb-writer-run{run_id}", daemon=True)
        self._thread.start()
        atexit.register(self._close_at_exit)    # a daemon thread dies with the interpreter

    # -- called from the training thread ------------------------------------------------
    def add(self, spec: RowSpec, row: tuple) -> None:
        queue = self.queue(spec)
        queue.append(row)
        if len(queue) >= self._batch_rows:
            self.wake()

    def queue(self, spec: RowSpec) -> deque:
        """The buffer of ``spec``'s rows: appending a tuple to it is ``add`` without its checks
        (the recorder's per-step path does that, and calls ``wake`` past ``batch_rows``)."""
        queue = self._queues.get(spec)
        return queue if queue is not None else self._queues.setdefault(spec, deque())

    def wake(self) -> None:
        if not self._wake.is_set():
            self._wake.set()

    def add_call(self, call: Callable[[Connection], Any]) -> None:
        """Run ``call(connection)`` in the next transaction, after its inserts."""
        self._calls.append(call)

    def set_run_fields(self, **fields: Any) -> None:
        with self._fields_lock:
            self._run_fields.update(fields)

    @property
    def pending(self) -> int:
        return sum(len(q) for q in list(self._queues.values())) + len(self._calls)

    def flush(self, timeout_s: float) -> bool:
        """Ask the thread to write everything added so far; wait up to ``timeout_s``.
        True when it is written; False leaves it to the thread (still buffered)."""
        with self._done:
            self._requested += 1
            wanted = self._requested
        self._wake.set()
        with self._done:
            return self._done.wait_for(lambda: self._written >= wanted, timeout=timeout_s)

    def close(self, timeout_s: float) -> int:
        """Write everything and stop the thread, retrying for up to ``timeout_s``; return how
        many rows are still unwritten then (0: all of them are in the database). Rows that
        could not be written are never dropped in silence: one error line says how many and why."""
        atexit.unregister(self._close_at_exit)
        self._deadline = time.monotonic() + timeout_s
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout_s + 1.0)
        left = self.pending + (1 if self._run_fields else 0)     # the run row's last fields count as one
        if left:
            log.error("expdb: %d rows of run %d are not written after %g s of retries: %s. They are "
                      "lost when this process exits (the rows written before are kept)",
                      left, self.run_id, timeout_s, self.unwritten_reason())
        return left

    def unwritten_reason(self) -> str:
        return str(self.last_error or "the database did not answer in time; check that it is writable "
                   "and not locked by another process")

    # -- the daemon thread ---------------------------------------------------------------
    def _loop(self) -> None:
        delay = self._interval_s
        while True:
            self._wake.wait(delay)
            self._wake.clear()
            with self._done:
                serving = self._requested
            started = time.thread_time()
            written = self._write_pending()
            self.cpu_s += time.thread_time() - started
            if written:
                delay = self._interval_s
                with self._done:
                    self._written = max(self._written, serving)
                    self._done.notify_all()
            else:       # back off, so that a long lock or a dead server is not hammered
                delay = min(max(delay, 0.05) * 2, _MAX_RETRY_DELAY_S)
            if self._stop.is_set() and (self._nothing_left() or time.monotonic() >= self._deadline):
                return

    def _nothing_left(self) -> bool:
        return not self.pending and not self._run_fields

    def _close_at_exit(self) -> None:
        self.close(timeout_s=10.0)

    # -- one transaction ------------------------------------------------------------------
    def _write_pending(self) -> bool:
        batch = {spec: [queue.popleft() for _ in range(len(queue))]
                 for spec, queue in list(self._queues.items()) if queue}
        calls = [self._calls.popleft() for _ in range(len(self._calls))]
        with self._fields_lock:
            fields, self._run_fields = self._run_fields, {}
        if not batch and not calls and not fields:
            return True
        try:
            with translated(self._where), self._engine.begin() as conn:
                self._write(conn, batch, calls, fields)
        except Exception as exc:    # noqa: BLE001 - the thread must outlive any failure
            self._put_back(batch, calls, fields)
            self._rollups.forget()
            self._note_failure(exc)
            return False
        if self.last_error is not None:
            log.warning("expdb: writing to %s works again", self._where)
            self.last_error = None
        return True

    def _write(self, conn: Connection, batch: dict[RowSpec, list[tuple]], calls: list,
               fields: dict[str, Any]) -> None:
        paramstyle = conn.dialect.paramstyle
        for spec, rows in batch.items():
            conn.exec_driver_sql(spec.sql(paramstyle), rows)
        if STEP in batch:
            self._rollups.update(conn, batch[STEP], paramstyle)
        for call in calls:
            call(conn)
        runs = Run.__table__
        conn.execute(update(runs).where(runs.c.id == self.run_id).values(updated_at=utcnow(), **fields))

    def _put_back(self, batch: dict[RowSpec, list[tuple]], calls: list, fields: dict[str, Any]) -> None:
        for spec, rows in batch.items():
            self._queues[spec].extendleft(reversed(rows))   # before the rows added meanwhile
        self._calls.extendleft(reversed(calls))
        with self._fields_lock:
            fields.update(self._run_fields)     # values set meanwhile are newer
            self._run_fields = fields

    def _note_failure(self, exc: Exception) -> None:
        if not isinstance(exc, ExpdbError):
            log.exception("expdb: unexpected error while writing run %d", self.run_id)
            exc = WriteError(f"unexpected error while writing run {self.run_id}: {exc!r}")
        elif self.last_error is None:       # log once per failing streak, not on every retry
            hint = " (retrying cannot help)" if isinstance(exc, ConflictError) else ""
            log.warning("expdb: %s; %d rows kept in memory and retried%s", exc, self.pending, hint)
        self.last_error = exc

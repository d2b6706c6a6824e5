"""MirroredRecorder: the database first, on the training thread; each mirror on a thread of its own.

The primary recorder (expdb's DBRecorder) is called synchronously, exactly as without
mirrors, so its exceptions (StopTraining from a pruner, LookupError on a resume from
another database) reach the trainer unchanged. Every call is then put on each mirror's
queue; a worker thread per mirror makes the tracker's calls. A mirror that raises is
switched off; the training thread learns of it on its next call and records one warning
and one ``mirror_failed`` event through the primary, from the training thread, because
the DB recorder is not thread-safe.
"""
from __future__ import annotations

import collections
import queue
import threading
import time
import warnings
from typing import Any, Callable, Sequence

from expdb.mirrors.base import (EVENT_MIRROR_FAILED, EVENT_MIRROR_LAGGED, BestTracker, CheckpointRef, Mirror,
                                MirrorRun, describe)
from trainer.recorder import Recorder, RunInfo

_STOP = object()


class MirrorWarning(UserWarning):
    """A mirror was switched off or fell behind; the run itself goes on."""


def warn_once(message: str) -> None:
    warnings.warn(message, MirrorWarning, stacklevel=3)


class MirrorWorker:
    """One mirror's queue and thread. ``submit`` is all the training thread ever does."""

    def __init__(self, mirror: Mirror, on_failure: Callable[["MirrorWorker", BaseException], None],
                 max_pending: int = 100_000, batch_interval_s: float = 0.05):
        self.mirror, self.name = mirror, mirror.name
        self._on_failure, self._max_pending = on_failure, max_pending
        # Woken at most every batch_interval_s, not per step: fewer GIL hand-overs mid-step.
        self._interval = batch_interval_s
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.alive, self.dropped = True, 0
        self._thread = threading.Thread(target=self._run, name=f"mirror-{self.name}", daemon=True)
        self._thread.start()

    def submit(self, item: tuple) -> None:
        if not self.alive:
            return
        if self._queue.qsize() >= self._max_pending:    # a stalled tracker must not eat the memory
            self.dropped += 1
            return
        self._queue.put(item)

    def stop(self, timeout_s: float) -> bool:
        """Let the queue run out, then end the thread; False when it is still busy after timeout_s."""
        self._queue.put(_STOP)
        self._thread.join(max(0.0, timeout_s))
        return not self._thread.is_alive()

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            for item in batch:
                if item is _STOP:
                    return
                if self.alive:
                    self._call(item)
            time.sleep(self._interval)

    def _call(self, item: tuple) -> None:
        method, *args = item
        try:
            getattr(self.mirror, method)(*args)
        except Exception as exc:        # noqa: BLE001 - any tracker fault switches the mirror off
            self.alive = False
            try:
                self.mirror.abandon()
            except Exception:           # noqa: BLE001 - already failed; nothing more to report
                pass
            self._on_failure(self, exc)


class MirroredRecorder:
    """A Recorder: ``primary`` synchronously, then every mirror through its worker.

    ``lookup(run_id)`` (``ExperimentDB.run``) gives the run's uid and, on a resume, the best
    validation loss so far; without it the uid is read from ``primary.run_uid`` if that
    exists. ``warn`` receives each user-facing message (one per failed mirror).
    """

    def __init__(self, primary: Recorder, mirrors: Sequence[Mirror], *, out_dir: str | None = None,
                 lookup: Callable[[int], Any] | None = None, warn: Callable[[str], None] = warn_once,
                 finish_timeout_s: float = 30.0, max_pending: int = 100_000):
        self.primary, self.mirrors = primary, list(mirrors)
        self._out_dir, self._lookup, self._warn = out_dir, lookup, warn
        self._finish_timeout_s, self._max_pending = finish_timeout_s, max_pending
        self._workers: list[MirrorWorker] = []
        self._failures: collections.deque = collections.deque()     # (worker, exc), appended by workers
        self._best = BestTracker()
        self._last_step: int | None = None

    # -- Recorder ------------------------------------------------------------------------
    def start_run(self, info: RunInfo) -> int:
        run_id = self.primary.start_run(info)       # LookupError etc. propagate; mirrors not opened
        run = self._mirror_run(info, run_id)
        self._best = BestTracker(run.best_val_loss, run.best_step, run.best_val_bpb)
        self._last_step = run.resume_step
        self._workers = [MirrorWorker(m, self._failed, self._max_pending) for m in self.mirrors]
        self._submit(("open", run))
        return run_id

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        self.primary.log_step(step, metrics)
        self._last_step = step
        item = ("step", step, dict(metrics))        # a copy: the caller may reuse its dict
        for worker in self._workers:
            worker.submit(item)
        if self._failures:
            self._report_failures()

    def log_eval(self, step: int, epoch: int, metrics: dict[str, float]) -> None:
        try:
            self.primary.log_eval(step, epoch, metrics)     # may raise StopTraining: it propagates
        finally:                                            # the evaluation happened either way
            self._best.saw_eval(step, metrics.get("val_loss"), metrics.get("val_bpb"))
            self._submit(("eval", step, epoch, dict(metrics)))

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        self.primary.log_epoch(epoch, metrics)
        self._submit(("epoch", epoch, dict(metrics)))

    def log_checkpoint(self, path: str, kind: str, step: int, val_loss: float | None,
                       size_bytes: int, sha256: str) -> None:
        self.primary.log_checkpoint(path, kind, step, val_loss, size_bytes, sha256)
        self._submit(("checkpoint", CheckpointRef(str(path), kind, step, val_loss, size_bytes, sha256)))

    def log_event(self, kind: str, step: int, detail: dict[str, Any]) -> None:
        self.primary.log_event(kind, step, detail)
        self._submit(("event", kind, step, dict(detail) if isinstance(detail, dict) else detail))

    def finish(self, status: str, reason: str | None = None) -> None:
        """Mirrors close first (bounded by finish_timeout_s), so that what they report can
        still go into the run's events; then the primary finishes the run."""
        if self._last_step is not None:
            self._best.saw_step(self._last_step)
        self._submit(("close", self._best.end(status, reason)))
        deadline = time.monotonic() + self._finish_timeout_s
        unfinished = [w for w in self._workers if not w.stop(deadline - time.monotonic())]
        self._report_failures()
        self._report_lag(unfinished)
        self.primary.finish(status, reason)

    def __getattr__(self, name: str) -> Any:
        # DBRecorder extras the composition root may read (run_id, writer_cpu_s).
        if name == "primary":
            raise AttributeError(name)
        return getattr(self.primary, name)

    # -- helpers -------------------------------------------------------------------------
    def _mirror_run(self, info: RunInfo, run_id: int) -> MirrorRun:
        record = self._lookup(run_id) if self._lookup is not None else None
        uid = getattr(record, "uid", None) or getattr(self.primary, "run_uid", None)
        resume = info.extra.get("resume_step") if info.extra.get("run_id") is not None else None
        out_dir = self._out_dir or str(info.config.get("out_dir") or ".")
        return MirrorRun(info, run_id, out_dir, uid, None if resume is None else int(resume),
                         getattr(record, "best_val_loss", None) if resume is not None else None,
                         getattr(record, "best_step", None) if resume is not None else None,
                         getattr(record, "best_val_bpb", None) if resume is not None else None)

    def _submit(self, item: tuple) -> None:
        for worker in self._workers:
            worker.submit(item)
        if self._failures:
            self._report_failures()

    def _failed(self, worker: MirrorWorker, exc: BaseException) -> None:
        self._failures.append((worker, exc))        # on the worker thread: a deque append only

    def _report_failures(self) -> None:
        while self._failures:
            worker, exc = self._failures.popleft()
            fix = _fix(worker.mirror, exc)
            self._warn(f"{worker.name} mirror switched off: {describe(exc)}. Fix: {fix}. "
                       "Training goes on; the experiment database has the whole run")
            self.primary.log_event(EVENT_MIRROR_FAILED, self._last_step,
                                   {"mirror": worker.name, "error": describe(exc), "fix": fix})

    def _report_lag(self, unfinished: list[MirrorWorker]) -> None:
        for worker in self._workers:
            late = worker in unfinished and worker.alive
            if worker.dropped or late:
                self._warn(f"{worker.name} mirror fell behind: {worker.dropped} calls dropped"
                           + (f", still writing after {self._finish_timeout_s:g} s" if late else "")
                           + "; replay the run later with `python -m expdb export`")
                self.primary.log_event(EVENT_MIRROR_LAGGED, self._last_step,
                                       {"mirror": worker.name, "dropped": worker.dropped, "unfinished": late})


def _fix(mirror: Mirror, exc: BaseException) -> str:
    try:
        return mirror.fix_for(exc)
    except Exception:               # noqa: BLE001 - a fix text must never be a second failure
        return f"see the error; or drop {mirror.name} from --report-to"

"""Checkpoint writes in a background thread, one at a time.

Training stalls only while the state is copied to host memory; writing, hashing and
fsyncing happen in a thread, under a temporary name. A second save first waits for the
write in flight (they share the host buffers). ``poll`` and ``drain`` hand finished
writes back to the training thread, which records them and then renames them into place
(the store): recorders are not thread-safe, and a checkpoint must never exist before the
metrics of the steps it holds are recorded.
"""
from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from trainer.checkpoints.capture import HostBuffers
from trainer.checkpoints.format import SaveResult, Snapshot, prepare_checkpoint


class BackgroundWriter:
    def __init__(self) -> None:
        self.buffers = HostBuffers()
        self._thread: threading.Thread | None = None
        self._in_flight: Path | None = None
        self._outcome: SaveResult | None = None      # set by the thread before it ends
        self._finished: list[SaveResult] = []

    @property
    def in_flight(self) -> Path | None:
        """The checkpoint being written, if any."""
        return self._in_flight if self._thread is not None else None

    def prepare_buffers(self, sources: dict[tuple[str, str], torch.Tensor]) -> None:
        """Allocate the host buffers in the background, so that the first save is as quick as the next."""
        if self._thread is None:
            self._thread = threading.Thread(target=self.buffers.reserve, args=(sources,), name="checkpoint-buffers")
            self._thread.start()

    def save(self, path: Path, take_snapshot: Callable[[HostBuffers], Snapshot]) -> float:
        """Wait for the write in flight, snapshot, start writing; return the seconds it stalled."""
        start = time.perf_counter()
        self._join()
        snapshot = take_snapshot(self.buffers)
        stalled = time.perf_counter() - start
        self._in_flight = Path(path)
        # Not a daemon: an exiting interpreter waits for the checkpoint to be complete.
        self._thread = threading.Thread(target=self._write, args=(Path(path), snapshot),
                                        name="checkpoint-writer")
        self._thread.start()
        return stalled

    def poll(self) -> list[SaveResult]:
        """Outcomes of the writes finished since the last call; never blocks."""
        if self._thread is not None and not self._thread.is_alive():
            self._join()
        finished, self._finished = self._finished, []
        return finished

    def drain(self) -> list[SaveResult]:
        """Wait for the write in flight; return every outcome not yet handed back."""
        self._join()
        return self.poll()

    def _write(self, path: Path, snapshot: Snapshot) -> None:
        try:
            self._outcome = prepare_checkpoint(path, snapshot)
        except BaseException as exc:   # handed to the training thread, which reports it
            self._outcome = SaveResult(replace(snapshot.info, path=path), error=exc)

    def _join(self) -> None:
        if self._thread is None:
            return
        self._thread.join()
        self._thread, self._in_flight = None, None
        if self._outcome is not None:      # None after prepare_buffers
            self._finished.append(self._outcome)
            self._outcome = None


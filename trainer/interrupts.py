"""SIGINT and SIGTERM become a request to stop at the next optimizer-step boundary.

Kaggle, Colab, Slurm and `kill` send SIGTERM; Ctrl-C and Jupyter's stop button send
SIGINT. Either only sets a flag here: the training loop finishes the step in progress,
writes an emergency checkpoint and raises ``TrainingInterrupted``. A second signal while
that happens raises KeyboardInterrupt at once, for someone who really wants out.

Handlers can only be installed from the main thread; elsewhere (a study running trials
in a thread) the process's own handling stays as it is.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequests:
    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.ignoring = False     # the process is ending on its own: further signals change nothing

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    @contextlib.contextmanager
    def installed(self) -> Iterator["StopRequests"]:
        """Catch the signals while the block runs; the previous handlers come back after it."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.getsignal(s) for s in SIGNALS}
        for s in SIGNALS:
            signal.signal(s, self._handle)
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, signal.SIG_IGN if self.ignoring else handler)

    def ignore_from_now(self) -> None:
        """Ignore SIGINT and SIGTERM for the rest of the process (also after the block), which
        is ending anyway: a data-parallel run whose rank died gets torchrun's SIGTERM while it
        records the failure, and must still record it and say why."""
        self.ignoring = True

    def _handle(self, signum: int, frame: object) -> None:
        if self.ignoring:
            return
        name = signal.Signals(signum).name
        if self.signal_name is not None:
            raise KeyboardInterrupt(f"second signal ({name}) while stopping")
        self.signal_name = name

"""Run several training loops in lock-step: one optimizer step each, in turn.

On a shared machine the load changes from second to second, so loops timed one after the
other see different machines. Here every loop runs in its own thread, but only the one
holding the turn computes; at the end of each optimizer step it stamps its clock and hands
the turn on. A loop's clock counts only the time it held the turn, so each contender's
throughput comes from the same seconds of the same machine, a step of each at a time.
The ``main`` loop runs in the calling (main) thread, where signal handlers can be installed;
turns go in the order of ``loops``.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

from bench.common import StepClock


class Aborted(Exception):
    """Raised in a loop at its next step when another loop of the group has failed."""


class TurnClock(StepClock):
    """Stamps the cumulative time its loop held the turn, and hands the turn on at each stamp."""

    def __init__(self, name: str, group: "Interleaved", sync: Callable[[], None] | None = None,
                 timer: Callable[[], float] = time.perf_counter):
        super().__init__()
        self.name, self._group, self._sync, self._timer = name, group, sync, timer
        self._active = 0.0
        self._resumed = 0.0

    def begin(self) -> None:
        self._group.wait_turn(self.name)
        self._resumed = self._timer()

    def stamp(self, step: int) -> None:
        if self._sync:
            self._sync()        # a GPU's queued work belongs to the step that queued it
        self._active += self._timer() - self._resumed
        self.stamps[step] = self._active
        self._group.pass_turn(self.name)
        self._group.wait_turn(self.name)
        if self._group.aborted:
            raise Aborted(f"{self.name}: stopped because another contender failed")
        self._resumed = self._timer()


class Interleaved:
    def __init__(self, names: list[str], sync: Callable[[], None] | None = None,
                 timer: Callable[[], float] = time.perf_counter):
        self.order = list(names)
        self.clocks = {n: TurnClock(n, self, sync, timer) for n in names}
        self._cond = threading.Condition()
        self._turn = names[0]
        self._done: set[str] = set()
        self.aborted = False        # set when a loop fails: the others stop at their next step

    def wait_turn(self, name: str) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._turn == name)

    def pass_turn(self, name: str, finished: bool = False) -> None:
        with self._cond:
            if finished:
                self._done.add(name)
            i = self.order.index(name)
            # the next loop still running, cyclically; this one again if it is the last
            for candidate in self.order[i + 1:] + self.order[:i + 1]:
                if candidate not in self._done:
                    self._turn = candidate
                    break
            self._cond.notify_all()


def run_interleaved(loops: dict[str, Callable[[StepClock], None]], main: str | None = None,
                    sync: Callable[[], None] | None = None,
                    timer: Callable[[], float] = time.perf_counter) -> dict[str, StepClock]:
    """Run every loop to its end, stepping in turn; each gets a clock of its own held time.
    ``sync`` (e.g. torch.cuda.synchronize) runs before every stamp; ``timer`` reads the time
    (a test passes a clock it advances itself, so that what it checks is the bookkeeping)."""
    names = list(loops)
    main = main or names[0]
    group = Interleaved(names, sync, timer)
    errors: dict[str, BaseException] = {}

    def body(name: str) -> None:
        clock = group.clocks[name]
        clock.begin()
        try:
            loops[name](clock)
        except BaseException as exc:  # noqa: BLE001 - re-raised below, after the others end
            errors[name] = exc
            group.aborted = True
        finally:
            group.pass_turn(name, finished=True)

    threads = [threading.Thread(target=body, args=(n,), name=f"bench-{n}", daemon=True) for n in names if n != main]
    for t in threads:
        t.start()
    body(main)
    for t in threads:
        t.join()
    if errors:
        first = next(iter(errors.items()))
        name, exc = next(((n, e) for n, e in errors.items() if not _caused_by_abort(e)), first)
        if isinstance(exc, KeyboardInterrupt):
            raise exc
        raise RuntimeError(f"contender {name!r} failed: {type(exc).__name__}: {exc}") from exc
    return group.clocks


def _caused_by_abort(exc: BaseException | None) -> bool:
    """True for Aborted itself or anything a loop raised while handling it (a wrapped error)."""
    while exc is not None:
        if isinstance(exc, Aborted):
            return True
        exc = exc.__cause__ or exc.__context__
    return False

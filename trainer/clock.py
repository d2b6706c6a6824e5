"""Time limits: parse --time-budget and --deadline, and decide when to stop before them.

A Kaggle session ends at its limit without warning, so the run must stop *before* it with
a checkpoint written. ``StopClock`` stops when the time left no longer covers one more
step (the slowest recently seen, with an evaluation if one is due), writing a checkpoint,
and a safety margin.

Tests must not depend on how fast the machine is, so time can be simulated: with
``TRAINER_SIMULATED_STEP_S=2`` every optimizer step counts 2 s and nothing else takes any
time, so a 12 s budget stops a run after the same step on a fast or a loaded machine.
``SimulatedTime.from_env()`` reads it once, at the command line (the composition root);
the run, and a study's rule that no trial starts that cannot finish, follow that one clock.
"""
from __future__ import annotations

import math
import os
import re
import threading
import time
from collections import deque
from datetime import datetime, timedelta

from trainer.errors import ConfigError

_UNIT_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([dhms])")
_CLOCK_TIME = re.compile(r"^(\d{1,2}):(\d{2})(?::(\d{2}))?$")
DURATION_EXAMPLE = "write it as 8h45m, 90m or 3600s"
DEADLINE_EXAMPLE = "write it as a local clock time such as 21:30, or an ISO date-time such as 2025-06-01T21:30"

MAX_MARGIN_S = 60.0        # the safety margin is 2% of the time limit, at most this much
STEP_SAFETY = 1.5          # the next step may be this much slower than the slowest recent one
DEFAULT_WRITE_MB_S = 50.0  # assumed write speed until a checkpoint write has been timed
SIMULATED_STEP_ENV = "TRAINER_SIMULATED_STEP_S"


def parse_duration(text: str) -> float:
    """'8h45m' -> 31500.0 seconds. Raises ValueError with an example on anything else."""
    compact = text.strip().lower().replace(" ", "")
    if not compact or _DURATION.sub("", compact):
        raise ValueError(DURATION_EXAMPLE)
    seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION.findall(compact))
    if seconds <= 0:
        raise ValueError("use a positive duration; " + DURATION_EXAMPLE)
    return seconds


def parse_deadline(text: str, now: datetime | None = None) -> datetime:
    """'21:30' -> the next 21:30 local time; an ISO date-time as is (local time when naive)."""
    now = now or datetime.now()
    match = _CLOCK_TIME.match(text.strip())
    if match:
        hour, minute, second = (int(g or 0) for g in match.groups())
        if hour > 23 or minute > 59 or second > 59:
            raise ValueError(DEADLINE_EXAMPLE)
        at = now.replace(hour=hour, minute=minute, second=second, microsecond=0)
        return at if at > now else at + timedelta(days=1)
    try:
        at = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(DEADLINE_EXAMPLE) from None
    if at.tzinfo is not None:
        at = at.astimezone().replace(tzinfo=None)   # compare in local time
    # One already past is no error here: a study's deadline can pass between two trials, whose run
    # then stops before its first step, interrupted. The command lines refuse one the user passed
    # (deadline_problem), before anything is written.
    return at


def deadline_problem(deadline: str, now: datetime | None = None) -> str | None:
    """Why the user's --deadline leaves no time at all (it has passed); None when it does not.
    A malformed one is the config's problem, not this one. (--time-budget counts from the start
    of training and parse_duration refuses 0 or less, so a budget cannot be spent before it.)"""
    now = now or datetime.now()
    try:
        at = parse_deadline(deadline, now) if deadline else None
    except ValueError:
        return None
    if at is None or at > now:
        return None
    return (f"--deadline {deadline!r}: that time has passed (it is now {now:%Y-%m-%dT%H:%M} local time), so "
            "the run could take no step; pass a later time, e.g. a clock time such as 21:30 (the next one) or "
            f"{now + timedelta(days=1):%Y-%m-%dT%H:%M}, or --time-budget 8h instead")


class SimulatedTime:
    """A clock that moves only when the run takes an optimizer step, by ``step_s`` each time.

    Calling it gives its monotonic reading (seconds since it was made); ``now()`` is the
    wall-clock time it stands for, for deadlines. One instance is shared by a study's workers
    and the trials they run, so the study's budget and each trial's see the same time.
    """

    def __init__(self, step_s: float, start: datetime | None = None):
        self.step_s = step_s
        self._start = start or datetime.now()
        self._elapsed = 0.0
        self._lock = threading.Lock()      # --n-jobs: several trials step at once

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "SimulatedTime | None":
        """TRAINER_SIMULATED_STEP_S=<seconds>, or None (real time). Raises ConfigError on a bad value."""
        text = (os.environ if environ is None else environ).get(SIMULATED_STEP_ENV, "").strip()
        if not text:
            return None
        try:
            step_s = float(text)
        except ValueError:
            step_s = math.nan
        if not (math.isfinite(step_s) and step_s > 0):
            raise ConfigError([f"{SIMULATED_STEP_ENV}={text!r}: expected the seconds one optimizer step "
                               "counts, a positive number like 0.5 (or leave it unset for real time)"])
        return cls(step_s)

    def __call__(self) -> float:
        return self._elapsed

    def now(self) -> datetime:
        return self._start + timedelta(seconds=self._elapsed)

    def take_step(self) -> float:
        """One optimizer step has been taken: time moves by ``step_s``, which is returned."""
        with self._lock:
            self._elapsed += self.step_s
        return self.step_s


def wall_clock(time_source: SimulatedTime | None = None) -> datetime:
    """Local wall-clock time: the real one, or the simulated one when a test set it."""
    return time_source.now() if time_source is not None else datetime.now()


def seconds_allowed(time_budget: str, deadline: str, now: datetime | None = None) -> float | None:
    """Seconds from now to the nearer of the two limits; None when neither is set."""
    now = now or datetime.now()
    limits = []
    if time_budget:
        limits.append(parse_duration(time_budget))
    if deadline:
        limits.append((parse_deadline(deadline, now) - now).total_seconds())
    return min(limits) if limits else None


class StopClock:
    """Measures steps, evaluations and checkpoint writes; says when to stop to beat the limit.

    ``clock`` is a monotonic time function, or a SimulatedTime: then a step counts its
    ``step_s`` whatever it measured, and evaluations and writes count nothing (a write is
    estimated from its size alone, as when and how fast a background write ends is the
    machine's speed).
    """

    def __init__(self, limit_s: float | None, clock=time.monotonic):
        self.limit_s = limit_s
        self._clock = clock
        self._simulated = clock if isinstance(clock, SimulatedTime) else None
        self._end = None if limit_s is None else clock() + limit_s
        # A limit already reached (a study's deadline passed between trials) has no margin, not a negative one.
        self._margin = 0.0 if limit_s is None else min(MAX_MARGIN_S, 0.02 * max(limit_s, 0.0))
        self._steps: deque[float] = deque(maxlen=20)
        self.eval_s = 0.0
        self.write_s: float | None = None

    @classmethod
    def for_limits(cls, time_budget: str, deadline: str, time_source: SimulatedTime | None = None) -> "StopClock":
        """The clock of a run with --time-budget / --deadline, counting from now."""
        limit_s = seconds_allowed(time_budget, deadline, wall_clock(time_source))
        return cls(limit_s) if time_source is None else cls(limit_s, clock=time_source)

    def record_step(self, seconds: float) -> None:
        self._steps.append(self._simulated.take_step() if self._simulated else seconds)

    def record_eval(self, seconds: float) -> None:
        if not self._simulated:
            self.eval_s = max(self.eval_s, seconds)

    def record_write(self, seconds: float) -> None:
        if not self._simulated:
            self.write_s = max(self.write_s or 0.0, seconds)

    def remaining(self) -> float:
        return float("inf") if self._end is None else self._end - self._clock()

    def needed(self, eval_next: bool, checkpoint_bytes: int) -> float:
        """Seconds one more step and a final checkpoint need, with the safety margin."""
        step = STEP_SAFETY * max(self._steps, default=0.0)
        write = self.write_s if self.write_s is not None else checkpoint_bytes / (DEFAULT_WRITE_MB_S * 1e6)
        return step + (self.eval_s if eval_next else 0.0) + write + self._margin

    def should_stop(self, eval_next: bool, checkpoint_bytes: int) -> bool:
        return self._end is not None and self.remaining() <= self.needed(eval_next, checkpoint_bytes)

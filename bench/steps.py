"""Step-level view of the interleaved runs: robust to load spikes, and it says where time goes.

The window throughput averages every second of a contender's turns, so a burst of load on the
machine during a few of its steps moves it by several percent. Here each optimizer step's own
duration is used instead:
- a *plain* step is one with no evaluation or checkpoint in it; the ratio of two contenders'
  plain steps taken in the same cycle of the interleaving (seconds apart), median over all
  steps of all rounds, compares the step itself;
- an evaluation or checkpoint falls into the step after the one it follows (the clock stamps
  at the end of the optimizer step, before them); its extra time is that step's duration minus
  the round's median plain step.
"""
from __future__ import annotations

import statistics

from bench.common import StepClock


def durations(clock: StepClock, first: int, last: int) -> dict[int, float]:
    """Seconds of each step first+1 .. last (what the loop did between two stamps)."""
    return {s: clock.stamps[s] - clock.stamps[s - 1] for s in range(first + 1, last + 1)}


def busy_steps(first: int, last: int, eval_every: int, save_every: int) -> set[int]:
    """Steps whose duration holds an evaluation or a checkpoint of the step before."""
    return {s for s in range(first + 1, last + 1)
            if (s - 1) % eval_every == 0 or (save_every and (s - 1) % save_every == 0)}


def paired_ratio(a: list[dict[int, float]], b: list[dict[int, float]], busy: set[int]) -> list[float]:
    """Per round, the median over plain steps of b's step time / a's (a's speed relative to b)."""
    return [statistics.median(rb[s] / ra[s] for s in ra if s not in busy) for ra, rb in zip(a, b)]


def plain_step_ms(rounds: list[dict[int, float]], busy: set[int]) -> list[float]:
    return [1e3 * statistics.median(d for s, d in r.items() if s not in busy) for r in rounds]


def extra_ms(rounds: list[dict[int, float]], busy: set[int]) -> list[float]:
    """Per round, the median extra time of the steps holding an evaluation or a checkpoint."""
    out = []
    for r in rounds:
        typical = statistics.median(d for s, d in r.items() if s not in busy)
        out.append(1e3 * statistics.median(r[s] - typical for s in busy))
    return out

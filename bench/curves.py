"""Validation bits per byte against training time: how bench.quality records a contender's curve.

``Validation`` is the one evaluation every contender is scored by. ``Watch`` is what a contender's
loop stamps at the end of each optimizer step (in place of the turn clock it wraps): it keeps the
training time (evaluations excluded), evaluates when due, and ends the loop at the largest budget.
``Run`` holds one curve and reads it: bits per byte at a budget, time to a given bits per byte.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from bench.common import StepClock
from trainer.data.batches import PackedBlocks
from trainer.data import PreparedData
from trainer.model import next_token_loss
from trainer.recorder import NullRecorder
from trainer.data.text_measure import bits_per_byte, text_counts, token_text


class Validation:
    """The fixed validation blocks (the trainer's: the first ``batches`` x ``micro_batch`` blocks),
    the bytes of text their targets stand for, and a model's bits per byte on them. On a GPU the
    blocks live on ``device`` and the forward pass runs under ``autocast`` (the contenders' own
    precision, as the trainer evaluates); the loss itself is fp32 either way (next_token_loss)."""

    def __init__(self, data: PreparedData, block_size: int, micro_batch: int, batches: int,
                 device: torch.device | None = None,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
        blocks = PackedBlocks(data.val, block_size)
        cpu = [blocks.get(ids) for ids in blocks.sequential(micro_batch, batches)]   # each (B, T+1)
        table = token_text(data.tokenizer)
        self.bytes = sum(text_counts(table, b)[0].item() for b in cpu)
        self.tokens = sum(b[:, 1:].numel() for b in cpu)
        self.batches = [b.to(device or "cpu") for b in cpu]      # copied once, not at every evaluation
        self.autocast = autocast

    @torch.no_grad()
    def bpb(self, model: torch.nn.Module) -> float:
        model.eval()
        nats = sum(next_token_loss(model, batch, self.autocast, reduction="sum").item() for batch in self.batches)
        model.train()
        return bits_per_byte(nats, self.bytes)


class CudaPeak:
    """The ``sync`` of the interleaved clocks on a GPU (bench.interleave runs it before every clock
    reading): waits for the queued work, then keeps the largest allocated CUDA memory seen so far.
    Read at every step's end because the trainer resets the allocator's peak at its loop's start and
    at each epoch's end (trainer.memory.reset_peak): one reading at the end would miss the steps before
    the last reset. What a contender does between the last stamp and its own reset (its set-up, its
    epoch-end evaluation) can be missed; no training step is. Not yet run on a GPU (none was lent)."""

    def __init__(self):
        torch.cuda.reset_peak_memory_stats()      # not an earlier seed's peak
        self.mb = 0.0

    def __call__(self) -> None:
        torch.cuda.synchronize()
        self.mb = max(self.mb, torch.cuda.max_memory_allocated() / 1024 ** 2)


class BudgetReached(Exception):
    """Ends a contender's loop at a step's end: the next step would pass its largest budget."""


@dataclass(frozen=True)
class Point:
    """One evaluation: after ``step`` optimizer steps and ``seconds`` of training."""

    seconds: float
    step: int
    bpb: float


class Watch:
    """Stamped by a contender's loop at the end of each optimizer step. Training time runs from the
    end of the first step (set-up and the first step's one-off costs left out alike) and leaves
    evaluations out. Evaluates after the first step, every ``every`` steps, before each budget (when
    the next step, as long as this one, would pass it) and at the end: before the largest budget,
    or at ``last_step``, where it raises BudgetReached. Without ``validation``, it only counts steps."""

    def __init__(self, clock: StepClock, validation: Validation | None, budgets_s: list[float], every: int,
                 last_step: int):
        self.clock, self.validation, self.every, self.last_step = clock, validation, every, last_step
        self.budgets_s = sorted(budgets_s)
        self.model: torch.nn.Module | None = None     # the loop shows it once built (watch)
        self.points: list[Point] = []
        self.excluded_s = 0.0
        self._previous_s = 0.0

    def watch(self, model: torch.nn.Module) -> None:
        self.model = model

    def seconds(self, step: int) -> float:
        return self.clock.stamps[step] - self.clock.stamps[1] - self.excluded_s

    def stamp(self, step: int) -> None:
        self.clock.stamp(step)       # an interleaved clock hands the turn on, and returns with it
        now = self.seconds(step)
        took, self._previous_s = now - self._previous_s, now      # this step's time: the guess for the next
        final = step >= self.last_step or now + took > self.budgets_s[-1]
        before_budget = any(now <= b < now + took for b in self.budgets_s)
        if step == 1 or step % self.every == 0 or before_budget or final:
            self.evaluate(step, now)
        if final:
            raise BudgetReached

    def evaluate(self, step: int, now: float) -> None:
        if self.validation is None:
            return
        started = time.perf_counter()
        self.points.append(Point(now, step, self.validation.bpb(self.model)))
        self.exclude(time.perf_counter() - started)

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` spent since the last stamp (an evaluation) out of the training time."""
        self.excluded_s += seconds


class WatchRecorder(NullRecorder):
    """The trainer's recorder in the comparison: stamps the watch at each step. The trainer's own
    evaluation at an epoch end runs between log_step and log_eval: it is left out of the time too."""

    def __init__(self, watch: Watch):
        self.watch, self._stamped = watch, time.perf_counter()

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        self.watch.stamp(step)
        self._stamped = time.perf_counter()

    def log_eval(self, step: int, epoch: int, metrics: dict[str, float]) -> None:
        self.watch.exclude(time.perf_counter() - self._stamped)


@dataclass(frozen=True)
class Run:
    """One contender's curve of one seed, and what its throughput and MFU need."""

    points: list[Point]
    planned_steps: int           # its schedule's length and step limit
    n_params: int
    flops_per_token: float
    tokens_per_step: int

    def bpb_at(self, seconds: float) -> float:
        """The last evaluation at or before ``seconds`` of training."""
        return next((p.bpb for p in reversed(self.points) if p.seconds <= seconds), math.nan)

    def time_to(self, bpb: float) -> float | None:
        """Training seconds to the first evaluation at or below ``bpb``, interpolated linearly in
        time from the evaluation before it; None when it never got there."""
        for before, p in zip([None, *self.points[:-1]], self.points):
            if p.bpb <= bpb:
                if before is None or before.bpb == p.bpb:
                    return p.seconds
                return before.seconds + (before.bpb - bpb) / (before.bpb - p.bpb) * (p.seconds - before.seconds)
        return None

    @property
    def tokens_per_s(self) -> float:
        """Over the steps after the first (the clock starts at its end), evaluations excluded."""
        end = self.points[-1]
        return (end.step - 1) * self.tokens_per_step / end.seconds if end.seconds > 0 else math.nan

"""How an optimizer step's sequences are batched: one value, built once from the config.

A step takes ``per_step`` sequences: each of ``world_size`` ranks takes its share of them
(``per_rank``) as ``grad_accum`` micro-batches of ``micro_batch`` sequences, one forward and
backward pass each. Everything that needs one of these numbers reads it from a Batching:
the training step, the out-of-memory ladder (``halved``), a resume by another number of
processes (``for_world``) and the schedule (``steps_per_epoch``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np


class Split(NamedTuple):
    """A rank's part of a Batching: ``micro_batch`` sequences per forward pass, ``grad_accum`` passes
    per step. What the older functions (trainer.faults, trainer.distributed.split_for) take and return."""

    micro_batch: int
    grad_accum: int


@dataclass(frozen=True)
class Batching:
    micro_batch: int         # sequences per forward/backward pass
    grad_accum: int          # micro-batches per optimizer step, on each rank
    world_size: int = 1      # ranks training together (torchrun)

    @classmethod
    def from_config(cls, cfg, world_size: int = 1) -> "Batching":
        """--micro-batch and --grad-accum of ``cfg`` (a TrainConfig), on ``world_size`` ranks."""
        return cls(cfg.micro_batch, cfg.grad_accum, world_size)

    @classmethod
    def of(cls, split: Split, world_size: int = 1) -> "Batching":
        return cls(split.micro_batch, split.grad_accum, world_size)

    @property
    def split(self) -> Split:
        return Split(self.micro_batch, self.grad_accum)

    @property
    def per_rank(self) -> int:
        """Sequences per optimizer step on one rank."""
        return self.micro_batch * self.grad_accum

    @property
    def per_step(self) -> int:
        """Sequences per optimizer step, all ranks together."""
        return self.per_rank * self.world_size

    def halved(self) -> "Batching":
        """The largest micro-batch up to half this one that divides a rank's share, with the
        accumulation that keeps the step's sequences (the out-of-memory ladder's first rung).
        Raises ValueError at micro-batch 1."""
        if self.micro_batch < 2:
            raise ValueError("micro-batch 1 cannot be halved")
        return self.with_micro_batch(max(n for n in range(1, self.micro_batch // 2 + 1) if self.per_rank % n == 0))

    def with_micro_batch(self, micro_batch: int) -> "Batching":
        """A rank's same sequences per step at ``micro_batch`` (which divides them), the accumulation to match."""
        return dataclasses.replace(self, micro_batch=micro_batch, grad_accum=self.per_rank // micro_batch)

    def for_world(self, world_size: int) -> "Batching | None":
        """The same ``per_step`` sequences shared by ``world_size`` ranks (``shared``)."""
        return Batching.shared(self.per_step, world_size, self.micro_batch)

    @staticmethod
    def shared(per_step: int, world_size: int, micro_batch: int) -> "Batching | None":
        """``per_step`` sequences a step shared by ``world_size`` ranks, at ``micro_batch`` where it divides
        a rank's share, else the largest that does. None when the ranks cannot share them evenly."""
        if per_step % world_size:
            return None
        per_rank = per_step // world_size
        micro = max(n for n in range(1, min(micro_batch, per_rank) + 1) if per_rank % n == 0)
        return Batching(micro, per_rank // micro, world_size)

    def steps_per_epoch(self, n_blocks: int) -> int:
        """Optimizer steps in one pass over ``n_blocks`` sequences; the blocks left over are not used."""
        return n_blocks // self.per_step

    def micro_batches(self, rank_share: np.ndarray) -> list[np.ndarray]:
        """A rank's share of a step (``per_rank`` sequence ids), as its ``grad_accum`` micro-batches."""
        return np.array_split(rank_share, self.grad_accum)

    def __str__(self) -> str:
        return f"micro-batch {self.micro_batch} x {self.grad_accum} accumulation x {self.world_size} process(es)"

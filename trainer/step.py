"""One optimizer step, top to bottom: what the trainer and the LR finder both take.

``train_step`` runs a rank's micro-batches (gradients synchronised over the ranks in the last
backward pass only), then unscales, clips, reads the loss and the gradient norm once, and
applies the update unless either is non-finite. It decides nothing else: the caller sets the
learning rate before it and records what it returns.

Wrapped around it, never inside it:
- ``with_micro_batch_retries`` redoes the step after an out-of-memory error, with the batching
  its caller's ladder gives (trainer.faults.remedy_after_oom; accelerate's
  ``find_executable_batch_size`` has the same shape);
- trainer.fault_injection's ``FaultInjector.around`` injects faults for the tests.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple, Sequence, TypeVar

import torch

from trainer.batching import Batching
from trainer.distributed import AgreedOutOfMemory, World, any_rank, forget_forward, mean_over_ranks
from trainer.faults import is_nonfinite
from trainer.memory import forget_failed_update, is_out_of_memory

T = TypeVar("T")


@dataclass(frozen=True)
class StepParts:
    """What a step runs."""

    loss_of: Callable[[object], torch.Tensor]   # a micro-batch -> its mean next-token loss (a scalar)
    model: torch.nn.Module          # the Hugging Face model: the parameters clipped
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    grad_clip: float                # the gradient norm's ceiling; 0: none
    device: torch.device
    ddp: torch.nn.Module | None = None   # DDP over the loss with several ranks: its no_sync, its reducer
    world: World = World()


class StepOutcome(NamedTuple):
    loss: float                # the step's mean loss, over its micro-batches and the ranks
    grad_norm: float           # before clipping
    updated: bool              # False: the loss or the gradient norm was not finite, no update
    scaler_skipped: bool       # fp16: the gradient scaler found inf/NaN gradients and skipped the update


def train_step(parts: StepParts, micro_batches: Sequence, step: int) -> StepOutcome:
    """Optimizer step ``step`` (1-based) over this rank's ``micro_batches``.

    Out of memory in a forward pass, or a backward pass before the last, is raised on every rank
    as AgreedOutOfMemory (``oom_agreed_before_sync``): all of them can redo the step. In the last
    backward pass or the update it is raised as it is.
    """
    optimizer, scaler = parts.optimizer, parts.scaler
    step_loss = torch.zeros((), device=parts.device)     # on the device: read once, after the loop
    with oom_agreed_before_sync(parts, step) as agree:
        for i, micro in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            with sync_gradients(parts.ddp, last):
                # Each micro-batch's share of the step's mean loss: their gradients add up to its gradient.
                loss = parts.loss_of(micro) / len(micro_batches)
                if last:
                    agree()      # every rank is here, or has raised: the all-reduce below is safe
                scaler.scale(loss).backward()      # the last: DDP averages the gradients over the ranks
            step_loss += loss.detach()
    with update_undone_on_oom(scaler, optimizer):
        scaler.unscale_(optimizer)     # before clipping: the threshold applies to the true gradient
        # Taken after DDP averaged the gradients: the same norm on every rank.
        grad_norm = torch.nn.utils.clip_grad_norm_(parts.model.parameters(),
                                                   parts.grad_clip if parts.grad_clip > 0 else math.inf)
        step_loss = mean_over_ranks(step_loss, parts.world)
        # The step's one host sync (not one per micro-batch): whether to skip the update needs both.
        mean_loss, norm = torch.stack([step_loss, grad_norm.to(step_loss.dtype)]).tolist()
        updated = not is_nonfinite(mean_loss, norm, scaler.is_enabled())
        if updated:
            skipped = scaler_step(scaler, optimizer)
        else:
            scaler.update()     # no step: the update is skipped, the weights stay finite
            skipped = False
    optimizer.zero_grad(set_to_none=True)
    return StepOutcome(mean_loss, norm, updated, skipped)


def scaler_step(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> bool:
    """The optimizer's step through the scaler; True when the scaler skipped it (fp16 overflow)."""
    scale = scaler.get_scale() if scaler.is_enabled() else None
    scaler.step(optimizer)     # with fp16, skipped by the scaler itself on overflow
    scaler.update()
    return scale is not None and scaler.get_scale() < scale


def sync_gradients(ddp: torch.nn.Module | None, sync: bool) -> contextlib.AbstractContextManager:
    """DDP's no_sync unless ``sync``: a backward pass in it keeps its gradients local."""
    return contextlib.nullcontext() if ddp is None or sync else ddp.no_sync()


@contextlib.contextmanager
def update_undone_on_oom(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Out of memory in clipping or in the optimizer's step (AdamW's first creates its state): what
    it left half done is undone, so that the step can be redone (trainer.memory.forget_failed_update)."""
    fresh = not optimizer.state
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - re-raised
        if is_out_of_memory(exc):
            forget_failed_update(scaler, optimizer, fresh)
        raise


class oom_agreed_before_sync:   # noqa: N801 - a context manager, named as the with statement reads
    """The micro-batch loop's out-of-memory agreement between the ranks.

    The last backward pass all-reduces the gradients: a rank that runs out of memory before it
    must tell the others before they enter it, so that all redo the step. ``agree()``, called
    before the last backward, asks every rank (one ``any_rank``); an out-of-memory error before
    that call asks them too, from ``__exit__``. Either way every rank raises AgreedOutOfMemory.
    Only the error's message is kept: its traceback holds the failed pass's activations.
    """

    def __init__(self, parts: StepParts, step: int):
        self.parts, self.step, self.agreed = parts, step, False

    def __enter__(self) -> Callable[[], None]:
        return lambda: self._agree(None)

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is None or self.agreed or not is_out_of_memory(exc):
            return False
        error = str(exc)
        exc.__traceback__ = tb = None    # noqa: F841 - the failed pass's frames are let go
        self._agree(error)
        return False     # not reached: _agree raised

    def _agree(self, error: str | None) -> None:
        self.agreed = True
        if any_rank(error is not None, self.parts.world, self.parts.device):
            forget_forward(self.parts.ddp)
            raise AgreedOutOfMemory(error or f"another process ran out of memory in step {self.step}") from None


def with_micro_batch_retries(step_at: Callable[[Batching], T], batching: Batching, world: World,
                             smaller: Callable[[Batching, str], Batching],
                             lost: Callable[[Batching, str], BaseException]) -> T:
    """``step_at(batching)``, redone after each out-of-memory error with ``smaller(batching, error)``
    (which frees the failed step's memory, records the event and returns the next rung of the
    ladder, or raises when none is left).

    With several ranks, an out-of-memory error they did not agree on (in the last backward pass,
    whose all-reduce the others are in, or in the update) cannot be redone in place:
    ``lost(batching, error)`` is raised.
    """
    while True:
        try:
            return step_at(batching)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled here
            if not is_out_of_memory(exc):
                raise
            if world.parallel and not isinstance(exc, AgreedOutOfMemory):
                raise lost(batching, str(exc))
            error = str(exc)
        # Out of the except clause: the traceback, and the failed pass's activations its frames
        # hold, are gone before the memory is freed and the step redone.
        batching = smaller(batching, error)

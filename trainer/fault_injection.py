"""Faults injected on purpose, so that the recovery paths can be tested on a machine without a GPU.

Fault injection (documented in README, "Surviving memory faults"): environment variables
name the optimizer steps (1-based, comma-separated) at which to fail, once each:

    TRAINER_INJECT_OOM=3,7      the forward pass of the last micro-batch raises
                                torch.cuda.OutOfMemoryError (the real type, on any device)
                                from inside the model, after its last block ran: the earlier
                                micro-batches have left their gradients and this one's
                                activations are alive, as a real allocator failure leaves them
    TRAINER_INJECT_OOM=3@1      the same, on rank 1 of a torchrun run only
    TRAINER_INJECT_OOM_BACKWARD=3@1   the same in that micro-batch's backward pass instead
    TRAINER_INJECT_OOM_UPDATE=1 the optimizer's step raises it, after the gradient scaler
                                unscaled the gradients, with the first parameter's state half
                                made, as AdamW creating its state at its first step leaves it
    TRAINER_INJECT_NAN=5,6,7    the step's loss is made NaN before backward

The trainer runs its step through ``FaultInjector.around`` when any of them is set: the step
itself (trainer.step) holds no hook for them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, TypeVar

import torch

from trainer.errors import ConfigError

INJECT_OOM_ENV = "TRAINER_INJECT_OOM"
INJECT_OOM_BACKWARD_ENV = "TRAINER_INJECT_OOM_BACKWARD"
INJECT_NAN_ENV = "TRAINER_INJECT_NAN"
INJECT_OOM_UPDATE_ENV = "TRAINER_INJECT_OOM_UPDATE"
Step = TypeVar("Step", bound=Callable)


@dataclass
class FaultInjector:
    """Failures to raise at given optimizer steps, each once (so a redone step succeeds)."""

    oom_steps: set[int] = field(default_factory=set)
    nan_steps: set[int] = field(default_factory=set)
    oom_backward_steps: set[int] = field(default_factory=set)
    oom_update_steps: set[int] = field(default_factory=set)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "FaultInjector":
        env = os.environ if environ is None else environ
        rank = int(env.get("RANK", "0"))             # set by torchrun
        return cls(*(_steps(env.get(name, ""), name, rank)
                     for name in (INJECT_OOM_ENV, INJECT_NAN_ENV, INJECT_OOM_BACKWARD_ENV, INJECT_OOM_UPDATE_ENV)))

    @contextlib.contextmanager
    def oom_inside(self, model: torch.nn.Module, step: int) -> Iterator[None]:
        """Around a forward pass of ``model`` (a GPT-2 or a Llama): at an injected step its last
        block raises out of memory once it has run, or (backward) once its gradient is computed."""
        from trainer.model import transformer_blocks

        forward, backward = step in self.oom_steps, step in self.oom_backward_steps
        if not (forward or backward):
            yield
            return
        self.oom_steps.discard(step)
        self.oom_backward_steps.discard(step)

        def fail(*_):
            name = INJECT_OOM_ENV if forward else INJECT_OOM_BACKWARD_ENV
            raise torch.cuda.OutOfMemoryError(f"injected by {name} at step {step}")

        def fail_in_backward(_module, _inputs, output):
            # A block returns its hidden states, or a tuple led by them (older transformers).
            hidden = output[0] if isinstance(output, tuple) else output
            hidden.register_hook(fail)
        hook = transformer_blocks(model)[-1].register_forward_hook(fail if forward else fail_in_backward)
        try:
            yield
        finally:
            hook.remove()

    @contextlib.contextmanager
    def oom_in_update(self, optimizer: torch.optim.Optimizer, step: int) -> Iterator[None]:
        """Around a step: at an injected step the optimizer's step, when it is called, raises out
        of memory once, leaving its first parameter's state half made (only its step count)."""
        if step not in self.oom_update_steps:
            yield
            return

        def fail(opt, *_):
            self.oom_update_steps.discard(step)
            first = opt.param_groups[0]["params"][0]
            if not opt.state[first]:
                opt.state[first]["step"] = torch.tensor(0.0)
            raise torch.cuda.OutOfMemoryError(f"injected by {INJECT_OOM_UPDATE_ENV} at step {step}")
        hook = optimizer.register_step_pre_hook(fail)
        try:
            yield
        finally:
            hook.remove()

    def corrupt_loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        if step in self.nan_steps:
            return loss * float("nan")
        return loss

    def after_step(self, step: int, updated: bool = False) -> None:
        """``step`` completed (its update applied, or skipped as non-finite when not ``updated``)."""
        self.nan_steps.discard(step)
        if updated:      # the update ran (the fp16 scaler may have skipped the optimizer): it was its turn
            self.oom_update_steps.discard(step)

    def armed(self) -> bool:
        return any((self.oom_steps, self.nan_steps, self.oom_backward_steps, self.oom_update_steps))

    def around(self, train_step: Step) -> Step:
        """``train_step`` (trainer.step.train_step) with these faults at their steps: the last
        micro-batch's forward (or backward) runs out of memory, every micro-batch's loss turns
        NaN, the optimizer's step runs out of memory."""
        def step_with_faults(parts, micro_batches, step: int):
            calls = iter(range(len(micro_batches)))
            loss_of = parts.loss_of

            def faulty_loss_of(micro):
                last = next(calls) == len(micro_batches) - 1
                with self.oom_inside(parts.model, step) if last else contextlib.nullcontext():
                    return self.corrupt_loss(step, loss_of(micro))
            with self.oom_in_update(parts.optimizer, step):
                outcome = train_step(dataclasses.replace(parts, loss_of=faulty_loss_of), micro_batches, step)
            self.after_step(step, outcome.updated)
            return outcome
        return step_with_faults


def _steps(text: str, name: str, rank: int) -> set[int]:
    """Step numbers like "3,7"; "3@1" is step 3 on rank 1 only."""
    steps = set()
    for item in filter(None, text.replace(" ", "").split(",")):
        step, at, on_rank = item.partition("@")
        if not step.isdigit() or (at and not on_rank.isdigit()):
            raise ConfigError([f"{name}={text!r}: expected optimizer step numbers like 3,7 (3@1: on rank 1 only)"])
        if not at or int(on_rank) == rank:
            steps.add(int(step))
    return steps

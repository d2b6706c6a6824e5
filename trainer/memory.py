"""Memory: recognising out-of-memory errors, freeing memory, reporting it, and injecting
faults so that the recovery paths can be tested on a machine without a GPU.

Fault injection (documented in README, "Surviving memory faults"): environment variables
name the optimizer steps (1-based, comma-separated) at which to fail, once each:

    TRAINER_INJECT_OOM=3,7      the forward pass of the last micro-batch raises
                                torch.cuda.OutOfMemoryError (the real type, on any device)
                                from inside the model, after its last block ran: the earlier
                                micro-batches have left their gradients and this one's
                                activations are alive, as a real allocator failure leaves them
    TRAINER_INJECT_OOM=3@1      the same, on rank 1 of a torchrun run only
    TRAINER_INJECT_OOM_BACKWARD=3@1   the same in that micro-batch's backward pass instead
    TRAINER_INJECT_NAN=5,6,7    the step's loss is made NaN before backward
"""
from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass, field
from typing import Iterator

import psutil
import torch

from trainer.errors import ConfigError

INJECT_OOM_ENV = "TRAINER_INJECT_OOM"
INJECT_OOM_BACKWARD_ENV = "TRAINER_INJECT_OOM_BACKWARD"
INJECT_NAN_ENV = "TRAINER_INJECT_NAN"
MB = 1024 ** 2


def is_out_of_memory(exc: BaseException) -> bool:
    """True for an allocator's out-of-memory error: CUDA's type first, then other backends'
    messages (MPS, XPU and the CPU raise a RuntimeError that says so)."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def free_memory() -> None:
    """Drop unreachable tensors and return cached GPU blocks to the driver."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class FaultInjector:
    """Failures to raise at given optimizer steps, each once (so a redone step succeeds)."""

    oom_steps: set[int] = field(default_factory=set)
    nan_steps: set[int] = field(default_factory=set)
    oom_backward_steps: set[int] = field(default_factory=set)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "FaultInjector":
        env = os.environ if environ is None else environ
        rank = int(env.get("RANK", "0"))             # set by torchrun
        return cls(*(_steps(env.get(name, ""), name, rank)
                     for name in (INJECT_OOM_ENV, INJECT_NAN_ENV, INJECT_OOM_BACKWARD_ENV)))

    @contextlib.contextmanager
    def oom_inside(self, model: torch.nn.Module, step: int) -> Iterator[None]:
        """Around a forward pass of ``model`` (a GPT2LMHeadModel): at an injected step its last
        block raises out of memory once it has run, or (backward) once its gradient is computed."""
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
        hook = model.transformer.h[-1].register_forward_hook(fail if forward else fail_in_backward)
        try:
            yield
        finally:
            hook.remove()

    def corrupt_loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        if step in self.nan_steps:
            return loss * float("nan")
        return loss

    def after_step(self, step: int) -> None:
        self.nan_steps.discard(step)


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


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each transformer block's activations in backward instead of keeping them.

    Non-reentrant checkpointing (PyTorch's recommended kind): it restores the RNG state for
    the recomputation, so dropout masks, and with them the gradients, are those of a plain
    step. Transformers 5 names it ``activation_checkpointing_enable``; older versions
    ``gradient_checkpointing_enable``. It acts only in training mode; evaluation is unchanged.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def gradient_checkpointing_on(model: torch.nn.Module) -> bool:
    if hasattr(model, "is_activation_checkpointing"):       # transformers 5 (the old name warns)
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


def clear_cache_if_due(step: int, every: int, device: torch.device) -> None:
    """--clear-cache-every N: hand cached GPU memory back to the driver every N optimizer steps."""
    if every and step % every == 0 and device.type == "cuda":
        torch.cuda.empty_cache()


def memory_report(device: torch.device) -> str:
    """One line, as the memory guide's check prints it, before training starts."""
    process = psutil.Process().memory_info().rss / MB
    available = psutil.virtual_memory().available / MB
    line = f"memory: process {process:,.0f} MB, system available {available:,.0f} MB"
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory / MB
        line += (f"; GPU allocated {torch.cuda.memory_allocated(device) / MB:,.0f} MB, reserved "
                 f"{torch.cuda.memory_reserved(device) / MB:,.0f} MB, peak "
                 f"{torch.cuda.max_memory_allocated(device) / MB:,.0f} MB of {total:,.0f} MB")
    return line


def largest_micro_batch(try_batch, effective_batch: int, device: torch.device, current: int,
                        headroom: float = 0.9) -> int:
    """The largest micro-batch dividing ``effective_batch`` whose forward and backward fit in
    ``headroom`` of the GPU's memory; ``try_batch(n)`` runs one pass of n sequences. Without
    a GPU there is no memory limit to probe: ``current`` is kept."""
    if device.type != "cuda":
        return current
    candidates = [n for n in range(effective_batch, 0, -1) if effective_batch % n == 0]
    total = torch.cuda.get_device_properties(device).total_memory
    for n in candidates:
        free_memory()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            try_batch(n)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is expected here
            if not is_out_of_memory(exc):
                raise
            continue
        if torch.cuda.max_memory_allocated(device) <= headroom * total:
            return n
    return 1


def training_memory_estimate(cfg, env=None, vocab_size: int | None = None) -> str:
    """What training ``cfg``'s model needs, from its shape alone, against what this machine has.

    Weights, gradients and AdamW's two moments are 16 bytes a parameter in fp32. Activations
    per layer follow Korthikanti et al. (2022): 34 x tokens x width + 5 x heads x sequence^2 x
    micro-batch bytes in 16-bit, twice that in fp32; the logits (tokens x vocabulary, fp32)
    are counted four times (output, its fp32 copy, softmax, gradient). An estimate:
    bench/peak_memory.py measures the kaggle-t4 preset at micro-batch 8 on the CPU at 7.05 GB
    peak resident, about 6.5 GB above the process's own; this says 5.1 GB.
    """
    vocab = vocab_size or (50257 if cfg.tokenizer == "gpt2" else cfg.vocab_size)
    n_params = vocab * cfg.n_embd + cfg.block_size * cfg.n_embd + cfg.n_layer * 12 * cfg.n_embd ** 2
    tokens = cfg.micro_batch * cfg.block_size
    per_layer = tokens * cfg.n_embd * 34 + 5 * cfg.micro_batch * cfg.n_head * cfg.block_size ** 2
    bytes_each = 2 if cfg.precision in ("bf16", "fp16") else 4    # "auto" counted as fp32: the safe side
    activations = cfg.n_layer * per_layer * bytes_each / 2 + 4 * tokens * vocab * 4
    needed = (16 * n_params + activations) / 1024 ** 3
    have = _available_gb(env)
    verdict = ("fits" if needed < 0.9 * have else "does NOT fit: lower --micro-batch (raise --grad-accum), "
               "--block-size, or use MODE low-memory") if have else "unknown: no memory figure here"
    return (f"memory check: {n_params / 1e6:.1f} M parameters, micro-batch {cfg.micro_batch} x {cfg.block_size} "
            f"tokens: about {needed:.1f} GB to train (weights, AdamW, activations) against {have:.1f} GB "
            f"available: {verdict}")


def _available_gb(env) -> float:
    gpus = getattr(env, "gpus", ()) if env is not None else ()
    if gpus:
        return gpus[0].memory_gb
    return psutil.virtual_memory().available / 1024 ** 3

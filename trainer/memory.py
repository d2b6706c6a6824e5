"""Memory: recognising out-of-memory errors, freeing memory, reporting it.

Injecting faults so that the recovery paths can be tested on a machine without a GPU
(TRAINER_INJECT_OOM and the others) is trainer.fault_injection; FaultInjector is imported
from here too.
"""
from __future__ import annotations

import gc
import threading
from collections import defaultdict

import psutil
import torch

from trainer.device import memory_snapshot
from trainer.fault_injection import FaultInjector  # noqa: F401 - its older home

MB = 1024 ** 2


def is_out_of_memory(exc: BaseException) -> bool:
    """True for an allocator's out-of-memory error: CUDA's type first, then other backends'
    messages (MPS, XPU and the CPU raise a RuntimeError that says so)."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def free_memory(device: torch.device) -> None:
    """Drop unreachable tensors; on a GPU, return its cached blocks to the driver when that
    disturbs no other run of this process.

    torch.cuda.empty_cache() empties the caches of every GPU this process uses (torch has no
    call for one device), so with another GPU's memory held here (a study's second trial on
    cuda:1) it is left alone: the caching allocator frees its own device's cached blocks and
    retries before it raises out of memory, so a redone step gets them anyway.
    """
    gc.collect()
    if device.type == "cuda" and not _other_gpus_hold_memory(device):
        torch.cuda.empty_cache()


def _other_gpus_hold_memory(device: torch.device) -> bool:
    index = device.index if device.index is not None else torch.cuda.current_device()
    return any(torch.cuda.memory_reserved(i) for i in range(torch.cuda.device_count()) if i != index)


def forget_failed_update(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer, fresh: bool) -> None:
    """Undo what an update that raised (out of memory while clipping or stepping) left half
    done, so that the step can be redone: the scaler's record of this step's unscale_ (the
    scale and its growth count stay), and, at the optimizer's first step (``fresh``), the
    state it was creating, which a parameter may hold only in part."""
    if scaler.is_enabled():
        scaler.update(scaler.get_scale())     # a given scale: no inf check, per-step records cleared
    if fresh:
        optimizer.state.clear()


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
    """--clear-cache-every N: hand cached GPU memory back to the driver every N optimizer steps
    (not while another GPU of this process holds memory: see free_memory)."""
    if every and step % every == 0 and device.type == "cuda" and not _other_gpus_hold_memory(device):
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
                        later_bytes: int = 0, headroom: float = 0.9) -> int:
    """The largest micro-batch dividing ``effective_batch`` whose forward and backward fit in
    what this GPU has for this run; ``try_batch(n)`` runs one pass of n sequences. Without a
    GPU there is no memory limit to probe: ``current`` is kept.

    The budget is measured, not assumed from the card's total: the driver's free memory
    (after the CUDA context, cuBLAS's workspace, DDP's buckets and other processes) plus what
    this process's cache holds unused, less ``later_bytes`` that the run allocates after the
    probe (AdamW's two moments, at its first step), times ``headroom``. A pass needs its peak
    above what was allocated before it. Probes of one GPU take turns within the process.
    """
    if device.type != "cuda":
        return current
    candidates = [n for n in range(effective_batch, 0, -1) if effective_batch % n == 0]
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _PROBE_LOCKS[index]:
        for n in candidates:
            if _pass_fits(try_batch, n, device, later_bytes, headroom):
                return n
    return 1


_PROBE_LOCKS: dict[int, threading.Lock] = defaultdict(threading.Lock)   # per GPU index


def _pass_fits(try_batch, n: int, device: torch.device, later_bytes: int, headroom: float) -> bool:
    free_memory(device)
    free, _total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    budget = headroom * (free + torch.cuda.memory_reserved(device) - allocated) - later_bytes
    torch.cuda.reset_peak_memory_stats(device)
    try:
        try_batch(n)
    except Exception as exc:  # noqa: BLE001 - only out-of-memory is expected here
        if not is_out_of_memory(exc):
            raise
        return False
    return torch.cuda.max_memory_allocated(device) - allocated <= budget


def optimizer_state_bytes(model: torch.nn.Module) -> int:
    """What AdamW allocates at its first step: two moments the size of each parameter."""
    return 2 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def reset_peak(device: torch.device) -> None:
    """Start a new peak of mem_gpu_peak_mb: at a run's start (not a study's previous trial's)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def epoch_memory(device: torch.device) -> dict[str, float | None]:
    """The epoch's memory figures (trainer.device.memory_snapshot), then a new peak, so that
    mem_gpu_peak_mb is each epoch's own peak and does not grow across epochs."""
    snapshot = memory_snapshot(device)
    reset_peak(device)
    return snapshot


def training_memory_estimate(cfg, env=None, vocab_size: int | None = None) -> str:
    """What training ``cfg``'s model needs, from its shape alone, against what this machine has.

    Weights, gradients and AdamW's two moments are 16 bytes a parameter in fp32. Activations
    per layer follow Korthikanti et al. (2022): 34 x tokens x width + 5 x heads x sequence^2 x
    micro-batch bytes in 16-bit, twice that in fp32. The loss holds one chunk's logits at a time
    (trainer.loss: chunk tokens x vocabulary, counted three times in fp32: the logits, their
    log-probabilities turned gradient, a 16-bit copy under autocast) and the output weight's
    gradient from the forward to the backward, never the whole micro-batch's logits (which were
    counted four times: 3.3 GB at kaggle-t4's size). An estimate: bench/peak_memory.py measures the
    kaggle-t4 preset at micro-batch 8 on the CPU at 3.81 GB peak resident, 3.29 GB above the process
    with the model built (5.84 and 5.33 GB with the full loss); this says 2.7 GB.
    """
    from trainer.loss import DEFAULT_CHUNK_TOKENS
    from trainer.model import padded_vocab

    # The model's vocabulary, padded past the tokenizer's. 12d^2 a block is GPT-2's; a Llama's SwiGLU
    # width is chosen to keep about the same (trainer.model.swiglu_width).
    vocab = padded_vocab(vocab_size or (50257 if cfg.tokenizer == "gpt2" else cfg.vocab_size))
    n_params = vocab * cfg.n_embd + cfg.block_size * cfg.n_embd + cfg.n_layer * 12 * cfg.n_embd ** 2
    tokens = cfg.micro_batch * cfg.block_size
    per_layer = tokens * cfg.n_embd * 34 + 5 * cfg.micro_batch * cfg.n_head * cfg.block_size ** 2
    bytes_each = 2 if cfg.precision in ("bf16", "fp16") else 4    # "auto" counted as fp32: the safe side
    loss = 3 * min(tokens, DEFAULT_CHUNK_TOKENS) * vocab * 4 + vocab * cfg.n_embd * 4
    activations = cfg.n_layer * per_layer * bytes_each / 2 + loss
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

"""The output projection and cross-entropy, a chunk of tokens at a time: never the whole logits.

At the kaggle-t4 size one micro-batch's logits are 8 x 512 tokens x 50,257 = 823 MB in fp32, and
the full loss keeps several tensors of that size alive (the logits, their fp32 copy, the log-softmax
kept for backward, its gradient): the loss, not the model, set the peak memory. Here the tied output
projection and the fp32 cross-entropy run on ``chunk_tokens`` tokens at a time, and each chunk's
gradients (with respect to the hidden states and the output weight) are computed in the same pass,
as Liger-Kernel's fused linear cross-entropy does: the backward only scales them, so nothing is
recomputed and no chunk's logits outlive it. The recorded loss is the full path's (fp32, summed
chunk by chunk: equal within 1e-6 relative). trainer.model.next_token_loss uses it; its
``chunk_tokens=0`` is the full path, kept to compare.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Tokens per chunk. 1024 keeps a chunk's logits at 206 MB in fp32 with GPT-2's vocabulary (a quarter
# of a kaggle-t4 micro-batch's) and each chunk's matrix products large enough to run at full speed.
# `python -m bench.peak_memory --loss` at that size on the CPU: the loss peaks 415 MB above its inputs
# against 2,323 MB for the full loss (803 MB at 2048, 218 MB at 512, which ran slower), in no more time.
DEFAULT_CHUNK_TOKENS = 1024


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int,
                          reduction: str = "mean", dtype: torch.dtype | None = None) -> torch.Tensor:
    """``F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction=reduction)`` for
    hidden (N, C), weight (vocab, C) and targets (N,), holding one chunk's logits at a time; the
    projection's products run in ``dtype`` (default: the weight's)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction {reduction!r}: use 'mean' or 'sum'")
    dtype = dtype or weight.dtype
    scale = 1.0 / targets.numel() if reduction == "mean" else 1.0
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_tokens, dtype, scale)
    total = torch.zeros((), device=hidden.device)
    w = weight.to(dtype)
    for h, t in zip(hidden.split(chunk_tokens), targets.split(chunk_tokens)):
        total += F.cross_entropy(F.linear(h.to(dtype), w).float(), t, reduction="sum")
    return total * scale


class _LinearCrossEntropy(torch.autograd.Function):
    """Loss and gradients of the output projection + cross-entropy, one chunk of tokens at a time.

    The gradients are those of the summed loss, computed in the forward pass (the chunk's logits
    are at hand there); the backward multiplies them by ``scale`` (1/N for a mean) and the incoming
    gradient (the loss scaler's factor, 1/accumulation), in fp32. The gradient of the logits,
    softmax - one-hot in [-1, 1], is rounded to ``dtype`` for the two products exactly as the full
    path's linear backward rounds it, only before those factors rather than after them.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_tokens, dtype, scale):
        w = weight.to(dtype)
        grad_hidden = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_tokens):
            h = hidden[start:start + chunk_tokens].to(dtype)        # (n, C)
            t = targets[start:start + chunk_tokens]                 # (n,)
            # F.cross_entropy is log_softmax then nll_loss: the same two steps, in fp32.
            log_probs = torch.log_softmax(F.linear(h, w).float(), dim=-1)   # (n, vocab)
            total += F.nll_loss(log_probs, t, reduction="sum")
            grad_logits = log_probs.exp_()                          # softmax, in place of the log-probs
            grad_logits[torch.arange(len(t), device=t.device), t] -= 1.0
            grad_logits = grad_logits.to(dtype)
            grad_hidden[start:start + chunk_tokens] = grad_logits @ w      # (n, C)
            grad_weight += (grad_logits.t() @ h).float()                   # (vocab, C), summed over chunks
            del log_probs, grad_logits     # before the next chunk's logits: one chunk's alive at a time
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.scale, ctx.dtypes = scale, (hidden.dtype, weight.dtype)
        return total * scale

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        factor = grad_loss.float() * ctx.scale
        hidden_dtype, weight_dtype = ctx.dtypes
        return ((grad_hidden * factor).to(hidden_dtype), (grad_weight * factor).to(weight_dtype),
                None, None, None, None)


def matmul_dtype(device: torch.device, weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype a linear layer computes in here: the autocast dtype where autocast is on."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return weight_dtype

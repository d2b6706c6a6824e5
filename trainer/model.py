"""The model: Hugging Face's GPT2LMHeadModel, built from the run's config, and its loss."""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from trainer.config import TrainConfig
from trainer.loss import DEFAULT_CHUNK_TOKENS, chunked_cross_entropy, matmul_dtype
from trainer.rng import seeded_init

FUSED_ADAMW_DEVICES = ("cuda", "cpu")    # where torch has a fused AdamW (torch >= 2.4 on the CPU)


def build_model(cfg: TrainConfig, vocab_size: int, eos_id: int) -> GPT2LMHeadModel:
    """A freshly initialised GPT-2 whose initial weights depend only on cfg.seed (not on
    another trial of the same process drawing at the same time: trainer.rng)."""
    gpt2_config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=cfg.block_size,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
    )
    with seeded_init(cfg.seed):
        return GPT2LMHeadModel(gpt2_config)


def next_token_loss(model: torch.nn.Module, batch: torch.Tensor,
                    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                    reduction: str = "mean", chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """Cross-entropy of predicting each next token of ``batch``, a (B, T+1) tensor of token ids.

    Only the forward pass runs under ``autocast`` (the output projection included): the loss is
    computed in fp32 whatever the autocast dtype. Training, evaluation, the LR finder and the
    --micro-batch auto probe all use this. The projection and the loss run ``chunk_tokens`` tokens
    at a time (trainer.loss), never on the whole (B, T, vocab) logits; 0 or None computes them whole.
    """
    inputs, targets = batch[:, :-1], batch[:, 1:]
    head = model.get_output_embeddings()      # GPT-2's lm_head, tied to the token embeddings
    if not chunk_tokens or head.bias is not None:
        with autocast():
            # No key/value cache: nothing is generated, and gradient checkpointing refuses one.
            logits = model(input_ids=inputs, use_cache=False).logits    # (B, T, vocab)
        # The loss in fp32: on bf16 logits it is 4x quicker on the CPU, but it rounds the loss itself
        # to bf16 (8.875 for 8.854), and the recorded losses must stay what they measure.
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction=reduction)
    with autocast():
        # The body: the blocks (checkpointed when gradient checkpointing is on) and the final norm.
        hidden = model.base_model(input_ids=inputs, use_cache=False).last_hidden_state    # (B, T, C)
        dtype = matmul_dtype(hidden.device, head.weight.dtype)     # the projection's, as autocast picks it
    return chunked_cross_entropy(hidden.flatten(0, 1), head.weight, targets.flatten(), chunk_tokens,
                                 reduction, dtype)


class LanguageModelLoss(torch.nn.Module):
    """A causal LM and its next-token loss as one module (nanoGPT's model returns its loss): what
    DDP and torch.compile wrap, so that DDP's forward, which prepares the gradient all-reduce, sees
    the whole pass. ``lm`` stays the model that is saved and exported."""

    def __init__(self, lm: torch.nn.Module, autocast: Callable[[], contextlib.AbstractContextManager]
                 = contextlib.nullcontext, chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS):
        super().__init__()
        self.lm, self.autocast, self.chunk_tokens = lm, autocast, chunk_tokens

    def forward(self, batch: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return next_token_loss(self.lm, batch, self.autocast, reduction, self.chunk_tokens)


def count_parameters(model: torch.nn.Module) -> int:
    # parameters() yields tied weights (wte and lm_head) once.
    return sum(p.numel() for p in model.parameters())


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only: biases and LayerNorm gains are not decayed. With
    --optimizer muon, the blocks' hidden matrices go to Muon instead, in the same optimizer
    (trainer.muon). Each group holds its peak lr as ``base_lr``, which the schedule scales."""
    from trainer.device import newton_schulz_dtype
    from trainer.muon import ADAMW, MUON, MuonWithAdamW, hidden_matrices, same_optimizer_only
    from trainer.schedule import keep_base_lrs

    device = next(model.parameters()).device
    # Fused: one kernel over all parameters. On a GPU it saves launches; on this project's
    # 2-core CPU it measured 1.0 ms a step against 2.8 ms for foreach (bench.breakdown).
    fused = device.type in FUSED_ADAMW_DEVICES
    matrices = hidden_matrices(model) if cfg.optimizer == MUON else []
    to_muon = {id(m.param) for m in matrices}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in to_muon]
    groups = [
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay, "base_lr": cfg.lr},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0, "base_lr": cfg.lr},
    ]
    if cfg.optimizer != MUON:
        adamw_only = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)
        return keep_base_lrs(same_optimizer_only(adamw_only))
    adamw = {"algorithm": ADAMW, "lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": 1e-8, "fused": fused}
    muon = {"algorithm": MUON, "lr": cfg.muon_lr, "base_lr": cfg.muon_lr, "momentum": cfg.muon_momentum,
            "weight_decay": cfg.muon_weight_decay}
    # AdamW's groups first: param_groups[0]["lr"] stays the --lr the metrics report.
    groups = [{**adamw, **g} for g in groups] + [
        {**muon, "in_out": in_out, "params": [m.param for m in matrices if m.in_out == in_out]}
        for in_out in (True, False) if any(m.in_out == in_out for m in matrices)]
    return keep_base_lrs(same_optimizer_only(MuonWithAdamW(groups, ns_dtype=newton_schulz_dtype(device))))


def compiled(model: torch.nn.Module, compile_model: bool) -> torch.nn.Module:
    """``model`` through torch.compile when --compile asks for it (the first steps compile)."""
    return torch.compile(model) if compile_model else model

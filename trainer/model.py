"""The model: Hugging Face's GPT2LMHeadModel or LlamaForCausalLM (--arch), built from the run's
config, and its loss."""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from trainer.config import ARCH_LLAMA, TrainConfig
from trainer.loss import DEFAULT_CHUNK_TOKENS, chunked_cross_entropy, matmul_dtype
from trainer.rng import seeded_init

FUSED_ADAMW_DEVICES = ("cuda", "cpu")    # where torch has a fused AdamW (torch >= 2.4 on the CPU)
# The model's vocabulary is the tokenizer's rounded up to a multiple of this (nanoGPT's 50257 -> 50304):
# the output projection's matrix products run faster on such sizes. The padded ids are never targets
# (no token stream holds them), so training pushes their logits down; generation suppresses them.
VOCAB_MULTIPLE = 64
SWIGLU_MULTIPLE = 64     # Llama's MLP width is a multiple of this, for the same reason


def padded_vocab(n: int) -> int:
    """The model's vocabulary for a tokenizer of ``n`` tokens: ``n`` rounded up to a multiple of 64."""
    return -(-n // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def build_model(cfg: TrainConfig, vocab_size: int, eos_id: int) -> PreTrainedModel:
    """A freshly initialised GPT-2 or Llama (--arch) whose initial weights depend only on cfg.seed (not
    on another trial of the same process drawing at the same time: trainer.rng). ``vocab_size`` is the
    tokenizer's; the model has padded_vocab(vocab_size) ids, and its generation config suppresses the
    padded ones (final_model/ keeps that: transformers' generate never emits them)."""
    rows = padded_vocab(vocab_size)
    llama = cfg.arch == ARCH_LLAMA
    config = _llama_config(cfg, rows, eos_id) if llama else _gpt2_config(cfg, rows, eos_id)
    with seeded_init(cfg.seed):
        model = LlamaForCausalLM(config) if llama else GPT2LMHeadModel(config)
    model.generation_config.suppress_tokens = list(range(vocab_size, rows)) or None
    return model


def _gpt2_config(cfg: TrainConfig, vocab_size: int, eos_id: int) -> GPT2Config:
    return GPT2Config(vocab_size=vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                      n_head=cfg.n_head, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
                      bos_token_id=eos_id, eos_token_id=eos_id)


def _llama_config(cfg: TrainConfig, vocab_size: int, eos_id: int) -> LlamaConfig:
    """Rotary positions (default theta), RMSNorm, SwiGLU, no biases, tied embeddings. Llama has no
    residual or embedding dropout: --dropout is its attention dropout only."""
    return LlamaConfig(vocab_size=vocab_size, hidden_size=cfg.n_embd, num_hidden_layers=cfg.n_layer,
                       num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_head,
                       intermediate_size=swiglu_width(cfg.n_layer, cfg.n_embd, cfg.block_size),
                       max_position_embeddings=cfg.block_size, attention_bias=False, mlp_bias=False,
                       tie_word_embeddings=True, attention_dropout=cfg.dropout,
                       bos_token_id=eos_id, eos_token_id=eos_id)


def swiglu_width(n_layer: int, n_embd: int, block_size: int) -> int:
    """Llama's MLP width h that gives it GPT-2's parameter count at the same size, to a multiple of 64.

    Both tie the output layer to the token embedding, so the vocabulary cancels out. A GPT-2 block
    has 12d^2 + 13d parameters (attention 4d^2 + 4d, MLP 8d^2 + 5d, two LayerNorms 4d), plus the
    model's learned positions (block_size x d) and final LayerNorm (2d); a Llama block has 4d^2 + 3dh
    (attention without biases, SwiGLU's three matrices) + 2d (two RMSNorms), plus the final RMSNorm
    (d). Equal when 3dh x n_layer = (8d^2 + 11d) x n_layer + block_size x d + d: h is about 8d/3 plus
    a little for the positions (356 at the default 4 x 128, context 128, which rounds to 384; 2080 at
    GPT-2 small's sizes, 2112), rounded to the nearest multiple of 64 (at least 64): the closest count
    that multiple allows, within 5% of GPT-2's at the default sizes.
    """
    d = n_embd
    exact = ((8 * d * d + 11 * d) * n_layer + block_size * d + d) / (3 * d * n_layer)
    return max(SWIGLU_MULTIPLE, SWIGLU_MULTIPLE * round(exact / SWIGLU_MULTIPLE))


def unpad_vocab(model: PreTrainedModel, rows: int) -> None:
    """Give ``model``, built padded, the ``rows`` ids of a checkpoint written before the vocabulary was
    padded (the tokenizer's exactly), in place, so that such a run resumes exactly as it would have.

    The token embedding keeps its Parameter (only its data shrinks): the optimizer built on it and the
    tied output layer, which is the same Parameter, stay valid.
    """
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head.weight is not embedding.weight:
        raise ValueError("the output layer is not tied to the token embedding")
    with torch.no_grad():
        embedding.weight.data = embedding.weight.data[:rows].clone()
    embedding.num_embeddings = head.out_features = model.config.vocab_size = rows
    for module in (model, model.base_model):      # LlamaForCausalLM and LlamaModel keep a copy
        if hasattr(module, "vocab_size"):
            module.vocab_size = rows
    model.generation_config.suppress_tokens = None


def transformer_blocks(model: PreTrainedModel) -> torch.nn.ModuleList:
    """The model's blocks in order: GPT-2's transformer.h, Llama's model.layers."""
    base = model.base_model
    return base.h if hasattr(base, "h") else base.layers


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
    head = model.get_output_embeddings()      # lm_head, tied to the token embeddings (both --arch)
    if not chunk_tokens or head.bias is not None:
        with autocast():
            # No key/value cache: nothing is generated, and gradient checkpointing refuses one.
            logits = model(input_ids=inputs, use_cache=False).logits    # (B, T, vocab)
        # The loss in fp32: on bf16 logits it is 4x quicker on the CPU, but it rounds the loss itself
        # to bf16 (8.875 for 8.854), and the recorded losses must stay what they measure.
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction=reduction)
    with autocast():
        # The body (GPT-2's transformer, Llama's model): the blocks (checkpointed when gradient
        # checkpointing is on) and the final norm.
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
    """AdamW with weight decay on matrices only: biases and norm gains (LayerNorm, RMSNorm) are not decayed. With
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

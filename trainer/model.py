"""The model: Hugging Face's GPT2LMHeadModel, built from the run's config."""
from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from trainer.config import TrainConfig


def build_model(cfg: TrainConfig, vocab_size: int, eos_id: int) -> GPT2LMHeadModel:
    """A freshly initialised GPT-2 whose initial weights depend only on cfg.seed."""
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
    torch.manual_seed(cfg.seed)
    return GPT2LMHeadModel(gpt2_config)


def count_parameters(model: torch.nn.Module) -> int:
    # parameters() yields tied weights (wte and lm_head) once.
    return sum(p.numel() for p in model.parameters())


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: biases and LayerNorm gains are not decayed."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)

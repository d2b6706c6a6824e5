"""The reference contender: a plain PyTorch loop in the style of nanoGPT's ``train.py``.

Random block offsets (nanoGPT's ``get_batch``), AdamW with decay on matrices only, warmup and
cosine learning rate, gradient clipping, an evaluation every ``eval_every`` steps and a
``torch.save`` of model and optimizer every ``save_every`` steps, overwritten in place. Nothing
is recorded besides the loss kept in memory every 10 steps, as nanoGPT prints it.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from bench.common import StepClock
from trainer.config import TrainConfig
from trainer.data import PreparedData
from trainer.model import build_model

LOG_INTERVAL = 10


def get_batch(tokens: np.ndarray, block_size: int, batch_size: int, device: torch.device,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    ix = torch.randint(len(tokens) - block_size - 1, (batch_size,), generator=generator)
    x = torch.stack([torch.from_numpy(tokens[i:i + block_size].astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy(tokens[i + 1:i + 1 + block_size].astype(np.int64)) for i in ix])
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x, y


def lr_at(step: int, cfg: TrainConfig, total: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - floor)


def run_plain(cfg: TrainConfig, data: PreparedData, precision: str, out_dir: Path,
              clock: StepClock, on_model: Callable[[torch.nn.Module], None] | None = None) -> None:
    """Train ``cfg.max_steps`` optimizer steps; stamp ``clock`` at the end of each one.
    ``on_model`` is shown the model once it is built (bench.quality evaluates it between steps)."""
    device = torch.device("cuda" if cfg.device == "cuda" else "cpu")
    torch.manual_seed(cfg.seed)
    # The batches' own generator: the other contenders, in other threads of the same process,
    # draw from torch's global one, and this loop's data order must depend on cfg.seed alone.
    batches = torch.Generator().manual_seed(cfg.seed)
    model = build_model(cfg, data.vocab_size, data.tokenizer.eos_token_id).to(device)
    model.train()
    if on_model:
        on_model(model)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    ctx = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    val_x, val_y = _val_batches(data.val, cfg, device)
    losses = []
    x, y = get_batch(data.train, cfg.block_size, cfg.micro_batch, device, batches)
    for step in range(1, cfg.max_steps + 1):
        lr = lr_at(step - 1, cfg, cfg.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for _ in range(cfg.grad_accum):
            with ctx:
                logits = model(input_ids=x).logits              # (B, T, vocab)
                loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1)) / cfg.grad_accum
            # Fetch the next batch while the GPU works on this one (nanoGPT does the same).
            x, y = get_batch(data.train, cfg.block_size, cfg.micro_batch, device, batches)
            scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        clock.stamp(step)
        if step % LOG_INTERVAL == 0:
            losses.append(loss.item() * cfg.grad_accum)
        if step % cfg.eval_every == 0:
            _estimate_loss(model, ctx, val_x, val_y)
        if cfg.save_every and step % cfg.save_every == 0:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "iter_num": step, "config": cfg.to_dict()}, out_dir / "ckpt.pt")


def _val_batches(val: np.ndarray, cfg: TrainConfig, device: torch.device
                 ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """The same fixed validation blocks the trainer evaluates: the first eval_batches x micro_batch."""
    n = cfg.eval_batches * cfg.micro_batch
    blocks = torch.from_numpy(val[:n * cfg.block_size + 1].astype(np.int64)).to(device)
    x = blocks[:-1].view(n, cfg.block_size)
    y = blocks[1:].view(n, cfg.block_size)
    return x.split(cfg.micro_batch), y.split(cfg.micro_batch)


@torch.no_grad()
def _estimate_loss(model, ctx, val_x, val_y) -> float:
    model.eval()
    losses = []
    for x, y in zip(val_x, val_y):
        with ctx:
            logits = model(input_ids=x).logits
            losses.append(F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1)).item())
    model.train()
    return sum(losses) / len(losses)

"""The Hugging Face ``Trainer`` contender: the same model, blocks, batch, schedule and cadence.

Left at its defaults where a user would leave them (its optimizer is ``adamw_torch_fused``),
with reporting to outside services off and ``dataloader_num_workers=0``. It evaluates every
``eval_every`` steps and saves model and optimizer every ``save_every`` steps, as the others do.
``run_hf_defaults`` is bench.quality's contender: there the training recipe too is the Trainer's own.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from bench.common import StepClock
from trainer.config import TrainConfig
from trainer.data import PreparedData
from trainer.model import build_model


class Blocks(torch.utils.data.Dataset):
    """Consecutive blocks of block_size tokens; the model shifts the labels itself."""

    def __init__(self, tokens: np.ndarray, block_size: int, limit: int | None = None):
        self.tokens, self.block_size = tokens, block_size
        n = (len(tokens) - 1) // block_size
        self.n = min(n, limit) if limit else n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.from_numpy(self.tokens[i * self.block_size:(i + 1) * self.block_size].astype(np.int64))
        return {"input_ids": ids, "labels": ids}


def run_hf(cfg: TrainConfig, data: PreparedData, precision: str, out_dir: Path, clock: StepClock) -> None:
    """Train ``cfg.max_steps`` optimizer steps with transformers.Trainer, stamping ``clock``."""
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments
    from transformers.utils import logging as hf_logging

    class Stamp(TrainerCallback):
        # on_step_end runs after the optimizer step and before evaluation and saving, the
        # same point at which the other loops stamp.
        def on_step_end(self, args, state, control, **kwargs):
            clock.stamp(state.global_step)

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    args = TrainingArguments(
        output_dir=str(out_dir), max_steps=cfg.max_steps, per_device_train_batch_size=cfg.micro_batch,
        per_device_eval_batch_size=cfg.micro_batch, gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr, lr_scheduler_type="cosine", warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay, adam_beta1=cfg.beta1, adam_beta2=cfg.beta2,
        max_grad_norm=cfg.grad_clip, eval_strategy="steps", eval_steps=cfg.eval_every,
        save_strategy="steps" if cfg.save_every else "no", save_steps=cfg.save_every or 500,
        logging_steps=1, report_to=[], dataloader_num_workers=0, use_cpu=cfg.device != "cuda",
        bf16=precision == "bf16", fp16=precision == "fp16", seed=cfg.seed, disable_tqdm=True,
    )
    model = build_model(cfg, data.vocab_size, data.tokenizer.eos_token_id)
    trainer = Trainer(model=model, args=args, train_dataset=Blocks(data.train, cfg.block_size),
                      eval_dataset=Blocks(data.val, cfg.block_size, cfg.eval_batches * cfg.micro_batch),
                      callbacks=[Stamp()])
    trainer.remove_callback(PrinterCallback)      # logs stay in trainer.state.log_history
    trainer.train()


def run_hf_defaults(cfg: TrainConfig, data: PreparedData, out_dir: Path, clock: StepClock,
                    on_model: Callable[[torch.nn.Module], None]) -> None:
    """transformers.Trainer as a user who sets only what must be set leaves it (bench.quality):
    its own learning rate (5e-5), linear decay to 0 over ``cfg.max_steps`` without warmup, no
    weight decay, betas (0.9, 0.999), its default optimizer. Set: the steps, the batch (the same
    tokens per step as the other contenders), the seed, the device and precision (default_arguments);
    checkpoints and reporting off, as for every contender of the comparison. ``on_model`` is shown
    the model before training."""
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.stamp(state.global_step)

    logging.getLogger("accelerate").setLevel(logging.ERROR)
    args = TrainingArguments(**default_arguments(cfg, out_dir))
    model = build_model(cfg, data.vocab_size, data.tokenizer.eos_token_id)
    on_model(model)
    trainer = Trainer(model=model, args=args, train_dataset=Blocks(data.train, cfg.block_size), callbacks=[Stamp()])
    trainer.remove_callback(PrinterCallback)
    trainer.train()


def default_arguments(cfg: TrainConfig, out_dir: Path) -> dict:
    """run_hf_defaults' TrainingArguments, as keywords (a test reads them without a GPU: the
    arguments themselves refuse fp16 where none is). ``cfg.precision`` fp16 is the Trainer's own
    fp16 mode, autocast with a gradient scaler, as a T4 trains; bf16 its bf16 autocast."""
    return dict(output_dir=str(out_dir), max_steps=cfg.max_steps, per_device_train_batch_size=cfg.micro_batch,
                gradient_accumulation_steps=cfg.grad_accum, seed=cfg.seed, use_cpu=cfg.device != "cuda",
                fp16=cfg.precision == "fp16", bf16=cfg.precision == "bf16",
                save_strategy="no", report_to=[], disable_tqdm=True)

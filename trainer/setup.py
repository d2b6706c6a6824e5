"""A run's set-up, apart from running it: ``setup`` builds the parts, once, before the first step.

torchtune's recipes have this shape (setup, train, cleanup): everything a run trains with is
built here and held in one value, ``RunParts``; trainer.loop.Trainer only steps them, and
trainer.run starts and ends the run around it. ``setup`` builds, in this order (the order
keeps the random streams, and the log lines, as they have always been):

- the train and validation blocks, refused with a DataError when one step or one validation
  batch does not fit in them;
- the model, the text each token id stands for (evaluation's bytes and words), dropout's seed;
- what a step runs (trainer.step.StepParts): the model and its loss as one module, DDP over it
  with several ranks, compiled with --compile; the optimizer and the gradient scaler; the step
  function itself, wrapped by the fault injector only when a test armed it;
- the TrainState with its Batching (--micro-batch auto: rank 0's probe decides), and the
  checkpoint store (rank 0 alone writes checkpoints);
- what the time limit and the epoch's MFU estimate from the model's size;
- then the resume: the checkpoint ``plan`` names is loaded into the model, optimizer and scaler,
  and its state replaces the fresh one; its warnings come back with it.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch

from trainer.batching import Batching
from trainer.checkpoints import CheckpointStore, ResumePlan, load_checkpoint, resume_notes
from trainer.config import TrainConfig
from trainer.data import PreparedData
from trainer.data.batches import PackedBlocks, to_device
from trainer.data.text_measure import token_text
from trainer.device import Placement
from trainer.distributed import World, from_main, resumed_batching, step_seed, wrap
from trainer.errors import DataError
from trainer.fault_injection import FaultInjector
from trainer.flops import flops_per_token
from trainer.memory import (enable_gradient_checkpointing, free_memory, gradient_checkpointing_on,
                            largest_micro_batch, memory_report, optimizer_state_bytes, reset_peak)
from trainer.model import LanguageModelLoss, build_model, build_optimizer, compiled, count_parameters, next_token_loss
from trainer.recorder import Recorder
from trainer.rng import seed_device
from trainer.schedule import steps_per_epoch, total_steps
from trainer.state import TrainState
from trainer.step import StepOutcome, StepParts, train_step

TrainStep = Callable[[StepParts, list, int], StepOutcome]     # trainer.step.train_step's shape


@dataclass(frozen=True)
class RunParts:
    """What one run trains with, built by ``setup``; none of them is replaced while it runs."""

    cfg: TrainConfig
    data: PreparedData
    placement: Placement
    world: World                     # this process among those training together (torchrun)
    train_blocks: PackedBlocks       # the training split, cut into block_size + 1 token sequences
    val_blocks: PackedBlocks         # the validation split: evaluation's fixed batches
    token_text: torch.Tensor         # each token id's bytes and words, on the device (evaluation's text counts)
    train_model: torch.nn.Module     # what the steps run: model and loss as one module, DDP'd, compiled
    step_parts: StepParts            # what a step runs: the loss of train_model, the model, optimizer, scaler
    train_step: TrainStep            # trainer.step.train_step, in the fault injector when a test armed it
    store: CheckpointStore | None    # this run's checkpoints folder on rank 0; None on the other ranks
    steps_per_epoch: int             # optimizer steps in one pass over the training blocks
    total_steps: int                 # every epoch's steps, or --max-steps if fewer
    checkpoint_bytes: int            # a checkpoint's size: the time limit's guess of one write before it is timed
    flops_per_token: float           # 6 N + attention (trainer.flops): the epoch's MFU

    @property
    def model(self) -> torch.nn.Module:
        """The Hugging Face model: what is saved, evaluated and exported."""
        return self.step_parts.model

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.step_parts.optimizer

    @property
    def scaler(self) -> torch.amp.GradScaler:
        return self.step_parts.scaler

    @property
    def device(self) -> torch.device:
        return self.placement.device

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.out_dir)

    def save(self, kind: str, state: TrainState, moment: int) -> str | None:
        """Start writing a checkpoint of ``state`` (rank 0, after a step); its path. ``moment`` is
        the optimizer steps this process took: it orders saves of a step that was taken again."""
        if self.store is None or state.step == 0:
            return None
        return self.store.save(kind, moment, model=self.model, optimizer=self.optimizer, scaler=self.scaler,
                               state=state, config=self.cfg.to_dict())


class SetUp(NamedTuple):
    parts: RunParts
    state: TrainState        # where the run starts: step 0, or the resumed checkpoint's
    notes: list[str]         # the resume's warnings: what makes it differ from an uninterrupted run


def setup(cfg: TrainConfig, data: PreparedData, placement: Placement, world: World, recorder: Recorder,
          log: Callable[[str], None], plan: ResumePlan) -> SetUp:
    """The run's parts, and the state it starts from: fresh, or the checkpoint ``plan`` names.

    Raises DataError when the data cannot make one step or one validation batch, and
    CheckpointError when the checkpoint fails its verification as it is read. Takes no step.
    """
    device = placement.device
    reset_peak(device)           # not an earlier run's peak on this GPU (a study's previous trial)
    train_blocks, val_blocks = blocks_that_fit(cfg, data, world)
    model = build_model(cfg, data.vocab_size, data.tokenizer.eos_token_id).to(device)
    # The text each token id stands for, once, on the device: every evaluation's bytes and words
    # are table lookups there (sized to the model's vocabulary, which may be padded past the tokenizer).
    text = token_text(data.tokenizer, model.config.vocab_size).to(device)
    # Dropout's stream: this device's generator alone (trainer.rng), each rank its own masks.
    seed_device(device, step_seed(cfg.seed, world, 0))
    step_parts, train_model = build_step_parts(cfg, placement, world, model, train_blocks)
    state = fresh_state(cfg, world, model)
    store = CheckpointStore(Path(cfg.out_dir) / "checkpoints", cfg, recorder, log) if world.is_main else None
    step_function = armed_train_step()
    if cfg.auto_micro_batch:     # rank 0 probes, every rank takes its answer
        state.batching = from_main(world, lambda: pick_micro_batch(model, train_blocks, placement,
                                                                   state.batching, log))
    log(memory_report(device))
    # Measured as built, before a resume from a checkpoint older than the padded vocabulary shrinks it.
    checkpoint_bytes = 4 * count_parameters(model) * (3 if cfg.save_optimizer_state else 1)
    flops = flops_per_token(model, cfg.block_size)
    state, notes = restore(plan, state, cfg, step_parts, store, log)
    # Counted from the batching the run goes on with: a resume by another number of processes
    # keeps the checkpoint's sequences per step, not the flags'.
    train_tokens = len(data.train)
    parts = RunParts(
        cfg=cfg, data=data, placement=placement, world=world, train_blocks=train_blocks, val_blocks=val_blocks,
        token_text=text, train_model=train_model, step_parts=step_parts,
        train_step=step_function, store=store,
        steps_per_epoch=steps_per_epoch(train_tokens, cfg, state.batching),
        total_steps=total_steps(train_tokens, cfg, state.batching),
        checkpoint_bytes=checkpoint_bytes, flops_per_token=flops)
    return SetUp(parts, state, notes)


def blocks_that_fit(cfg: TrainConfig, data: PreparedData, world: World) -> tuple[PackedBlocks, PackedBlocks]:
    """The train and validation blocks; a DataError before any model is built when one optimizer
    step's sequences, or one validation sequence, do not fit in them."""
    train_blocks, val_blocks = PackedBlocks(data.train, cfg.block_size), PackedBlocks(data.val, cfg.block_size)
    if len(train_blocks) < Batching.from_config(cfg, world.size).per_step:
        raise DataError(
            f"the training split has {len(train_blocks)} blocks of {cfg.block_size} tokens, fewer than "
            f"one optimizer step needs (--micro-batch {cfg.micro_batch} x --grad-accum {cfg.grad_accum} x "
            f"{world.size} process(es)); "
            "use more data (--subset 1.0) or a smaller --block-size / --micro-batch")
    if len(val_blocks) == 0:
        raise DataError(f"the validation split has fewer than {cfg.block_size + 1} tokens; "
                        "use a larger --val-fraction or a smaller --block-size")
    return train_blocks, val_blocks


def build_step_parts(cfg: TrainConfig, placement: Placement, world: World, model: torch.nn.Module,
                     train_blocks: PackedBlocks) -> tuple[StepParts, torch.nn.Module]:
    """What a step runs, and the module its loss calls: the model and its (chunked) loss as one
    module, DDP over it with several ranks, compiled with --compile. The model itself stays the
    Hugging Face model that is saved."""
    ddp = wrap(LanguageModelLoss(model, placement.autocast), world, placement.device)
    train_model = compiled(ddp, cfg.compile)
    optimizer, scaler = build_optimizer(model, cfg), placement.grad_scaler()
    loss_of = partial(micro_batch_loss, train_model, train_blocks, placement.device)
    return StepParts(loss_of, model, optimizer, scaler, cfg.grad_clip, placement.device,
                     ddp if world.parallel else None, world), train_model


def armed_train_step() -> TrainStep:
    """trainer.step.train_step, run inside the fault injector when a test armed it
    (TRAINER_INJECT_OOM and the others: trainer.fault_injection); as it is otherwise."""
    faults = FaultInjector.from_env()
    return faults.around(train_step) if faults.armed() else train_step


def micro_batch_loss(train_model: torch.nn.Module, blocks: PackedBlocks, device: torch.device,
                     ids: np.ndarray) -> torch.Tensor:
    """One micro-batch's mean loss (LanguageModelLoss: trainer.model.next_token_loss)."""
    return train_model(to_device(blocks.get(ids), device))      # (B, T+1) in


def fresh_state(cfg: TrainConfig, world: World, model: torch.nn.Module) -> TrainState:
    """Step 0 at the flags' batching; gradient checkpointing on with --gradient-checkpointing true."""
    state = TrainState(gradient_checkpointing=cfg.gradient_checkpointing == "true")
    state.batching = Batching.from_config(cfg, world.size)
    apply_gradient_checkpointing(model, state)
    return state


def apply_gradient_checkpointing(model: torch.nn.Module, state: TrainState) -> None:
    """Turn it on in the model when the state says so (set-up, a resume, the out-of-memory ladder);
    once on, it stays on."""
    if state.gradient_checkpointing and not gradient_checkpointing_on(model):
        enable_gradient_checkpointing(model)


def restore(plan: ResumePlan, state: TrainState, cfg: TrainConfig, step_parts: StepParts,
            store: CheckpointStore | None, log: Callable[[str], None]) -> tuple[TrainState, list[str]]:
    """Continue from ``plan.path`` (verified again as it is read), or start fresh from ``state``.

    Returns the state to start from, and the warnings of a resume: what makes it differ from an
    uninterrupted run. Opens the checkpoint store either way.
    """
    if plan.path is None:
        if cfg.resume == "auto":
            log(plan.reason)
        if store:
            store.open(None)
        return state, []
    model, world = step_parts.model, step_parts.world
    resumed, saved = load_checkpoint(plan.path, model=model, optimizer=step_parts.optimizer,
                                     scaler=step_parts.scaler)
    # The batching to go on with: the checkpoint's, shared anew if the number of processes changed.
    resumed.batching, world_note = resumed_batching(
        resumed.batching, Batching(saved.get("micro_batch"), saved.get("grad_accum")),
        Batching.from_config(cfg, world.size))
    if cfg.gradient_checkpointing != "auto":   # an explicit setting wins over what auto turned on
        resumed.gradient_checkpointing = cfg.gradient_checkpointing == "true"
    apply_gradient_checkpointing(model, resumed)
    notes = resume_notes(plan, saved, cfg) + ([world_note] if world_note else [])
    if store:
        store.open(plan.path)
    log(f"resuming from {plan.path}: {plan.reason}")
    for note in notes:
        log(f"warning: {note}")
    return resumed, notes


def pick_micro_batch(model: torch.nn.Module, blocks: PackedBlocks, placement: Placement, batching: Batching,
                     log: Callable[[str], None]) -> Batching:
    """--micro-batch auto: the largest micro-batch that fits, at the same sequences per rank."""
    def try_batch(n: int) -> None:
        batch = blocks.get(np.arange(n) % len(blocks)).to(placement.device)
        next_token_loss(model, batch, placement.autocast).backward()
        model.zero_grad(set_to_none=True)

    micro = largest_micro_batch(try_batch, batching.per_rank, placement.device, batching.micro_batch,
                                later_bytes=optimizer_state_bytes(model))
    picked = batching.with_micro_batch(micro)
    free_memory(placement.device)
    log(f"--micro-batch auto: {picked.micro_batch} x {picked.grad_accum} accumulation steps"
        + ("" if placement.device.type == "cuda" else " (no GPU memory to probe: the configured micro-batch)"))
    return picked

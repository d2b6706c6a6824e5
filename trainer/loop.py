"""The training loop: optimizer steps, and what happens between two of them.

``Trainer.run_steps`` is the loop. The optimizer step reads top to bottom in
``Trainer._optimizer_step``; what happens between two steps (logging, evaluation, epoch
end, checkpoint, a reload after non-finite steps) in ``Trainer._after_step``. Faults are
decided in trainer.faults, which returns what to do; the loop applies it. How a run
starts and ends (the recorder's row, final and emergency checkpoints, signals, the time
budget) is trainer.run, which drives this loop: the loop returns why it stopped and never
calls back.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from trainer.batches import PackedBlocks
from trainer.checkpoints import CheckpointStore, ResumePlan, load_checkpoint, resume_notes
from trainer.clock import StopClock
from trainer.config import TrainConfig
from trainer.data import PreparedData
from trainer.device import Placement, memory_snapshot
from trainer.errors import DataError
from trainer.faults import count_nonfinite, is_nonfinite, pick_micro_batch, reload_before_streak, split_after_oom
from trainer.interrupts import StopRequests
from trainer.memory import FaultInjector, clear_cache_if_due, is_out_of_memory, memory_report
from trainer.metrics import perplexity
from trainer.model import build_model, build_optimizer, count_parameters, next_token_loss
from trainer.recorder import EVENT_SCALER_SKIP, Recorder
from trainer.schedule import lr_at, steps_per_epoch, total_steps
from trainer.state import TrainState

TIME = "time"     # a Halt's cause when the time budget or deadline is near


@dataclass(frozen=True)
class Halt:
    """Why the steps stopped before the end."""

    cause: str               # TIME, or the signal: "SIGTERM", "SIGINT", "KeyboardInterrupt"
    mid_step: bool = False   # cut inside a step: the weights and the data position disagree


class StepResult(NamedTuple):
    loss: float
    grad_norm: float
    lr: float
    reload: bool             # a streak of non-finite steps calls for a reload (trainer.faults)


class Trainer:
    """One run's model, optimizer, data position and checkpoints, stepped by ``run_steps``."""

    def __init__(self, cfg: TrainConfig, data: PreparedData, placement: Placement, recorder: Recorder,
                 stops: StopRequests, clock: StopClock, log=print):
        self.cfg, self.data, self.placement, self.recorder, self.log = cfg, data, placement, recorder, log
        self.stops, self.clock = stops, clock
        self.device = placement.device
        # Only one process writes files and records when several train together (torchrun).
        self.is_main = int(os.environ.get("RANK", "0")) == 0
        self.train_blocks = PackedBlocks(data.train, cfg.block_size)
        self.val_blocks = PackedBlocks(data.val, cfg.block_size)
        self._check_data_fits()
        self.steps_per_epoch = steps_per_epoch(len(data.train), cfg)
        self.total_steps = total_steps(len(data.train), cfg)
        self.model = build_model(cfg, data.vocab_size, data.tokenizer.eos_token_id).to(self.device)
        self.optimizer = build_optimizer(self.model, cfg)
        self.scaler = placement.grad_scaler()
        self.state = TrainState(micro_batch=cfg.micro_batch, grad_accum=cfg.grad_accum)
        self.out_dir = Path(cfg.out_dir)
        self.store = CheckpointStore(self.out_dir / "checkpoints", cfg, recorder, log) if self.is_main else None
        self.tokens_per_s = math.nan
        self.faults = FaultInjector.from_env()   # TRAINER_INJECT_OOM / TRAINER_INJECT_NAN (trainer.memory)
        self.steps_taken = 0            # optimizer steps taken by this process (a step may be retaken)
        self._order: tuple[int, np.ndarray] | None = None
        if cfg.auto_micro_batch:
            self.state.micro_batch, self.state.grad_accum = pick_micro_batch(
                self.model, self.train_blocks, placement, self.state.split, log)
        self.log(memory_report(self.device))
        self._checkpoint_bytes = 4 * count_parameters(self.model) * (3 if cfg.save_optimizer_state else 1)

    def _check_data_fits(self) -> None:
        cfg = self.cfg
        if len(self.train_blocks) < cfg.effective_batch:
            raise DataError(
                f"the training split has {len(self.train_blocks)} blocks of {cfg.block_size} tokens, fewer than "
                f"one optimizer step needs (--micro-batch {cfg.micro_batch} x --grad-accum {cfg.grad_accum}); "
                "use more data (--subset 1.0) or a smaller --block-size / --micro-batch")
        if len(self.val_blocks) == 0:
            raise DataError(f"the validation split has fewer than {cfg.block_size + 1} tokens; "
                            "use a larger --val-fraction or a smaller --block-size")

    # -- resume -----------------------------------------------------------------------
    def restore(self, plan: ResumePlan) -> list[str]:
        """Continue from ``plan.path`` (verified again as it is read), or start fresh.

        Returns the warnings of a resume: what makes it differ from an uninterrupted run.
        """
        if plan.path is None:
            if self.cfg.resume == "auto":
                self.log(plan.reason)
            if self.store:
                self.store.open(None)
            return []
        self.state, saved = load_checkpoint(plan.path, model=self.model, optimizer=self.optimizer,
                                            scaler=self.scaler)
        # The run may have lowered its micro-batch (memory); keep that unless the settings changed.
        if (saved.get("micro_batch"), saved.get("grad_accum")) != (self.cfg.micro_batch, self.cfg.grad_accum) \
                or self.state.micro_batch * self.state.grad_accum != self.cfg.effective_batch:
            self.state.micro_batch, self.state.grad_accum = self.cfg.micro_batch, self.cfg.grad_accum
        notes = resume_notes(plan, saved, self.cfg)
        if self.store:
            self.store.open(plan.path)
        self.log(f"resuming from {plan.path}: {plan.reason}")
        for note in notes:
            self.log(f"warning: {note}")
        return notes

    # -- the steps ------------------------------------------------------------------------
    def run_steps(self) -> Halt | None:
        """Steps until the end (None), or until a signal or the time limit says stop (a Halt).

        Raises StopTraining when a recorder prunes the run or a fault ends it.
        """
        bar = tqdm(total=self.total_steps, initial=self.state.step, unit="step", dynamic_ncols=True,
                   disable=not (self.cfg.progress and self.is_main))
        in_step = False
        try:
            while self.state.step < self.total_steps and self.state.epoch < self.cfg.epochs:
                halt = self._halt()
                if halt:
                    return halt
                if self._epoch_used_up():       # resumed from a step whose epoch end did not finish
                    self._end_epoch()
                    continue
                started = time.perf_counter()
                in_step = True                  # until _advance the weights are ahead of the position
                sample_ids = self._next_sample_ids()
                step = self.optimizer_step(sample_ids)
                self.steps_taken += 1
                self._advance(len(sample_ids), step.loss, time.perf_counter() - started)
                in_step = False
                self._after_step(bar, step)
                self.clock.record_step(time.perf_counter() - started)
        except KeyboardInterrupt:
            return Halt("KeyboardInterrupt", mid_step=in_step)
        finally:
            bar.close()
        return None

    def _next_sample_ids(self) -> np.ndarray:
        state = self.state
        if self._order is None or self._order[0] != state.epoch:
            self._order = (state.epoch, self.train_blocks.epoch_order(self.cfg.seed, state.epoch))
        return self._order[1][state.sample_pos:state.sample_pos + self.cfg.effective_batch]

    def optimizer_step(self, sample_ids: np.ndarray) -> StepResult:
        """One optimizer step over len(sample_ids) sequences.

        Out of memory: the micro-batch is halved and the whole step redone (trainer.faults).
        """
        while True:
            try:
                return self._optimizer_step(sample_ids)
            except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled here
                if not is_out_of_memory(exc):
                    raise
                self.optimizer.zero_grad(set_to_none=True)   # the failed step's half-accumulated gradients
                self.state.micro_batch, self.state.grad_accum = split_after_oom(
                    self.state.split, self.state.step + 1, exc, self.recorder, self.log)
                self.state.oom_recoveries += 1

    def _optimizer_step(self, sample_ids: np.ndarray) -> StepResult:
        cfg, model, step = self.cfg, self.model, self.state.step + 1
        lr = lr_at(self.state.step, cfg, self.total_steps) * self.state.lr_scale
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        micro_batches = np.array_split(sample_ids, len(sample_ids) // self.state.micro_batch)
        total_loss = 0.0
        for i, ids in enumerate(micro_batches):
            batch = self.train_blocks.get(ids).to(self.device, non_blocking=True)  # (B, T+1)
            if i == len(micro_batches) - 1:
                self.faults.before_forward(step)  # injected OOM: earlier micro-batches' gradients exist
            # Averaged over the micro-batches: the gradient is that of the whole step's mean loss.
            loss = next_token_loss(model, batch, self.placement.autocast) / len(micro_batches)
            loss = self.faults.corrupt_loss(step, loss)
            self.scaler.scale(loss).backward()
            total_loss += loss.item()
        # Unscale before clipping so the threshold applies to the true gradient.
        self.scaler.unscale_(self.optimizer)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()
        reload = False
        if is_nonfinite(total_loss, grad_norm, self.scaler.is_enabled()):
            self.scaler.update()   # no step: the update is skipped, the weights stay finite
            reload = count_nonfinite(self.state, total_loss, grad_norm, cfg.max_nonfinite_steps, self.recorder)
        else:
            self._apply_update()
        self.optimizer.zero_grad(set_to_none=True)
        self.faults.after_step(step)
        self.state.step += 1
        return StepResult(total_loss, grad_norm, lr, reload)

    def _apply_update(self) -> None:
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)   # with fp16, skipped by the scaler itself on overflow
        self.scaler.update()
        if scale is not None and self.scaler.get_scale() < scale:   # it found inf/NaN gradients
            self.state.scaler_skips += 1
            self.recorder.log_event(EVENT_SCALER_SKIP, self.state.step + 1,
                                    {"scale": self.scaler.get_scale(), "total": self.state.scaler_skips})
        self.state.nonfinite_streak = 0

    def _advance(self, n_samples: int, loss: float, seconds: float) -> None:
        state = self.state
        state.sample_pos += n_samples
        state.tokens_seen += n_samples * self.cfg.block_size
        state.epoch_losses.append(loss)
        state.epoch_seconds += seconds
        self.tokens_per_s = n_samples * self.cfg.block_size / seconds

    def _after_step(self, bar: tqdm, step: StepResult) -> None:
        cfg, state = self.cfg, self.state
        bar.update(1)
        bar.set_postfix(loss=f"{step.loss:.3f}", lr=f"{step.lr:.2e}", tok_s=f"{self.tokens_per_s:,.0f}",
                        refresh=False)
        if state.step % cfg.log_every == 0:
            self.recorder.log_step(state.step, {"loss": step.loss, "lr": step.lr, "grad_norm": step.grad_norm,
                                                "tokens_per_s": self.tokens_per_s, "epoch": state.epoch,
                                                "tokens_seen": state.tokens_seen})
        evaluated = state.step % cfg.eval_every == 0
        if evaluated:
            self._evaluate_and_report()
        epoch_ended = self._epoch_used_up()
        if epoch_ended:
            self._end_epoch()
        self._checkpoint_if_due(evaluated or epoch_ended, epoch_ended)
        clear_cache_if_due(state.step, cfg.clear_cache_every, self.device)
        if step.reload:     # here, between steps, where the weights and the data position agree
            self.state = reload_before_streak(state, self.store, model=self.model, optimizer=self.optimizer,
                                              scaler=self.scaler, recorder=self.recorder, log=self.log)

    def _epoch_used_up(self) -> bool:
        return self.state.sample_pos + self.cfg.effective_batch > self.steps_per_epoch * self.cfg.effective_batch

    def _end_epoch(self) -> None:
        state = self.state
        val_loss = self._evaluate_and_report()
        losses = [x for x in state.epoch_losses if math.isfinite(x)]
        seconds, tokens = state.epoch_seconds, state.sample_pos * self.cfg.block_size
        metrics = {
            "train_loss": float(np.mean(losses)) if losses else math.nan,
            "val_loss": val_loss, "val_ppl": perplexity(val_loss),
            "lr": self.optimizer.param_groups[0]["lr"], "step": state.step,
            "epoch_seconds": seconds, "tokens_per_s": tokens / seconds if seconds > 0 else math.nan,
            **memory_snapshot(self.device),
        }
        epoch = state.epoch
        # The position moves first: an interruption after it never logs this epoch twice.
        state.epoch, state.sample_pos, state.epoch_losses, state.epoch_seconds = epoch + 1, 0, [], 0.0
        self.recorder.log_epoch(epoch, metrics)
        self.log(f"epoch {epoch}: train loss {metrics['train_loss']:.4f}, val loss {val_loss:.4f}, "
                 f"ppl {metrics['val_ppl']:.2f}, {seconds:.1f} s")

    # -- evaluation -------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss per token over the fixed validation batches."""
        self.model.eval()
        total, count = 0.0, 0
        for ids in self.val_blocks.sequential(self.state.micro_batch, self.cfg.eval_batches):
            batch = self.val_blocks.get(ids).to(self.device)
            total += next_token_loss(self.model, batch, self.placement.autocast, reduction="sum").item()
            count += batch[:, 1:].numel()
        self.model.train()
        return total / count

    def _evaluate_and_report(self) -> float:
        state = self.state
        if state.evaluated_now:
            return state.last_val_loss   # this step was just evaluated
        started = time.perf_counter()
        val_loss = self.evaluate()
        state.last_val_loss, state.last_eval_step = val_loss, state.step
        if val_loss < state.best_val_loss:
            state.best_val_loss, state.best_step = val_loss, state.step
        seconds = time.perf_counter() - started
        state.epoch_seconds += seconds
        self.clock.record_eval(seconds)
        self.recorder.log_eval(state.step, state.epoch, {"val_loss": val_loss, "val_ppl": perplexity(val_loss)})
        return val_loss

    # -- checkpoints and stopping ---------------------------------------------------------
    def _checkpoint_if_due(self, evaluated: bool, epoch_ended: bool) -> None:
        cfg, state = self.cfg, self.state
        if self.store is None:
            return
        self.store.prepare(self.model, self.optimizer)      # once: the buffers the first save copies into
        due = (cfg.save_every and state.step % cfg.save_every == 0) or epoch_ended or (cfg.save_on_eval and evaluated)
        if due and state.step < self.total_steps:     # at the last step the final save follows
            self.save("best" if state.evaluated_now and state.best_step == state.step else "periodic")
        for saved in self.store.poll():
            self.clock.record_write(saved.seconds)

    def save(self, kind: str) -> str | None:
        """Start writing a checkpoint of this step (main process only); its path."""
        if self.store is None or self.state.step == 0:
            return None
        return self.store.save(kind, self.steps_taken, model=self.model, optimizer=self.optimizer,
                               scaler=self.scaler, state=self.state, config=self.cfg.to_dict())

    def _halt(self) -> Halt | None:
        if self.stops.requested:
            return Halt(self.stops.signal_name)
        if self.clock.should_stop(self._eval_due_next(), self._checkpoint_bytes):
            return Halt(TIME)
        return None

    def time_needed(self) -> float:
        """Seconds one more step (with its evaluation, if due) and a checkpoint would take."""
        return self.clock.needed(self._eval_due_next(), self._checkpoint_bytes)

    def _eval_due_next(self) -> bool:
        return (self.state.step + 1) % self.cfg.eval_every == 0

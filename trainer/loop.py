"""The training run: set up once, then optimizer steps, evaluations, checkpoints.

``train(cfg, recorder)`` is the whole public surface. The optimizer step reads top to
bottom in ``Trainer.optimizer_step``; what happens between two steps (logging,
evaluation, epoch end, checkpoint, whether to stop) in ``Trainer._after_step`` and
``Trainer._halt_reason``. How a run starts and ends (the recorder's row, final and
emergency checkpoints, signals, the time budget) is in ``trainer.lifecycle``.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from trainer.batches import PackedBlocks
from trainer.checkpoint import KEY_CONFIG, read_checkpoint
from trainer.clock import StopClock, seconds_allowed
from trainer.config import TrainConfig
from trainer.data import PreparedData, prepare_data
from trainer.device import Placement, memory_snapshot, place
from trainer.errors import DataError
from trainer.interrupts import StopRequests
from trainer.faults import (clear_cache_if_due, is_nonfinite, pick_micro_batch, recover_from_oom,
                            reload_before_streak, skip_update)
from trainer.lifecycle import RunResult, run
from trainer.memory import FaultInjector, is_out_of_memory, memory_report
from trainer.model import build_model, build_optimizer, count_parameters
from trainer.recorder import EVENT_SCALER_SKIP, NullRecorder, Recorder
from trainer.resume import ResumePlan, plan_resume, resume_notes
from trainer.schedule import lr_at
from trainer.snapshot import restore
from trainer.state import TrainState
from trainer.store import CheckpointStore


def train(cfg: TrainConfig, recorder: Recorder | None = None, *, data: PreparedData | None = None,
          resume: str | None = None, log=print) -> RunResult:
    """Train one model as ``cfg`` says; report everything to ``recorder``.

    ``resume`` overrides ``cfg.resume``. Raises TrainingInterrupted after a signal, once
    the emergency checkpoint is complete (see trainer.errors for the exit codes).
    """
    if resume is not None:
        cfg = cfg.replace(resume=str(resume))
    cfg.check()
    clock = StopClock(seconds_allowed(cfg.time_budget, cfg.deadline))   # the budget counts from here
    placement = place(cfg)
    plan = plan_resume(cfg)              # before the data: a bad --resume answers at once
    data = data or prepare_data(cfg, log=log)
    with StopRequests().installed() as stops:
        trainer = Trainer(cfg, data, placement, recorder or NullRecorder(), stops, clock, log=log)
        trainer.restore(plan)
        return run(trainer)


class Trainer:
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
        self.steps_per_epoch = len(self.train_blocks) // cfg.effective_batch
        self.total_steps = self.steps_per_epoch * cfg.epochs
        if cfg.max_steps:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.model = build_model(cfg, data.vocab_size, data.tokenizer.eos_token_id).to(self.device)
        self.optimizer = build_optimizer(self.model, cfg)
        self.scaler = placement.grad_scaler()
        self.state = TrainState(micro_batch=cfg.micro_batch, grad_accum=cfg.grad_accum)
        self.out_dir = Path(cfg.out_dir)
        self.store = CheckpointStore(self.out_dir / "checkpoints", cfg, recorder, log) if self.is_main else None
        self.plan = ResumePlan(None, None, "fresh start")
        self.resume_notes: list[str] = []
        self.tokens_per_s = math.nan
        self.faults = FaultInjector.from_env()   # TRAINER_INJECT_OOM / TRAINER_INJECT_NAN (trainer.memory)
        self.reload_after_streak = False
        self.in_step = False            # True while the model and the data position disagree
        self.steps_taken = 0            # optimizer steps taken by this process (a step may be retaken)
        self._order: tuple[int, np.ndarray] | None = None
        if cfg.auto_micro_batch:
            pick_micro_batch(self)
        self.log(memory_report(self.device))
        n = count_parameters(self.model)
        self._checkpoint_bytes = 4 * n * (3 if cfg.save_optimizer_state else 1)

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
    def restore(self, plan: ResumePlan) -> None:
        """Continue from ``plan.path`` (verified again as it is read), or start fresh."""
        self.plan = plan
        if plan.path is None:
            if self.cfg.resume == "auto":
                self.log(plan.reason)
            if self.store:
                self.store.open(None)
            return
        snapshot = read_checkpoint(plan.path)
        self.state = restore(snapshot, model=self.model, optimizer=self.optimizer, scaler=self.scaler,
                             where=f"checkpoint {plan.path}")
        saved = snapshot.state[KEY_CONFIG]
        # The run may have lowered its micro-batch (memory); keep that unless the settings changed.
        split = (self.state.micro_batch, self.state.grad_accum)
        if (saved.get("micro_batch"), saved.get("grad_accum")) != (self.cfg.micro_batch, self.cfg.grad_accum) \
                or split[0] * split[1] != self.cfg.effective_batch:
            self.state.micro_batch, self.state.grad_accum = self.cfg.micro_batch, self.cfg.grad_accum
        self.resume_notes = resume_notes(plan, saved, self.cfg)
        if self.store:
            self.store.open(plan.path)
        self.log(f"resuming from {plan.path}: {plan.reason}")
        for note in self.resume_notes:
            self.log(f"warning: {note}")

    # -- the steps ------------------------------------------------------------------------
    def train_steps(self) -> str | None:
        """Steps until the end; returns why it stopped early ("signal", "time") or None."""
        cfg, state = self.cfg, self.state
        bar = tqdm(total=self.total_steps, initial=state.step, unit="step", dynamic_ncols=True,
                   disable=not (cfg.progress and self.is_main))
        try:
            while state.step < self.total_steps and state.epoch < cfg.epochs:
                halt = self._halt_reason()
                if halt:
                    return halt
                if self._epoch_used_up():       # resumed from a step whose epoch end did not finish
                    self._end_epoch()
                    continue
                started = time.perf_counter()
                self.in_step = True
                sample_ids = self._next_sample_ids()
                loss, grad_norm, lr = self.optimizer_step(sample_ids)
                self.steps_taken += 1
                self._advance(len(sample_ids), loss, time.perf_counter() - started)
                self.in_step = False
                self._after_step(bar, loss, grad_norm, lr)
                self.clock.record_step(time.perf_counter() - started)
        finally:
            bar.close()
        return None

    def _next_sample_ids(self) -> np.ndarray:
        state = self.state
        if self._order is None or self._order[0] != state.epoch:
            self._order = (state.epoch, self.train_blocks.epoch_order(self.cfg.seed, state.epoch))
        return self._order[1][state.sample_pos:state.sample_pos + self.cfg.effective_batch]

    def optimizer_step(self, sample_ids: np.ndarray) -> tuple[float, float, float]:
        """One optimizer step over len(sample_ids) sequences; returns (loss, grad norm, lr).

        Out of memory: the micro-batch is halved and the whole step redone (trainer.faults).
        """
        while True:
            try:
                return self._optimizer_step(sample_ids)
            except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled here
                if not is_out_of_memory(exc):
                    raise
                recover_from_oom(self, exc)

    def _optimizer_step(self, sample_ids: np.ndarray) -> tuple[float, float, float]:
        cfg, model, step = self.cfg, self.model, self.state.step + 1
        lr = lr_at(self.state.step, cfg, self.total_steps) * self.state.lr_scale
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        micro_batches = np.array_split(sample_ids, len(sample_ids) // self.state.micro_batch)
        total_loss = 0.0
        for i, ids in enumerate(micro_batches):
            batch = self.train_blocks.get(ids).to(self.device, non_blocking=True)  # (B, T+1)
            inputs, targets = batch[:, :-1], batch[:, 1:]
            if i == len(micro_batches) - 1:
                self.faults.before_forward(step)  # injected OOM: earlier micro-batches' gradients exist
            with self.placement.autocast():
                logits = model(input_ids=inputs).logits                           # (B, T, vocab)
            # The loss in fp32 whatever the autocast dtype; averaged over the micro-batches.
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()) / len(micro_batches)
            loss = self.faults.corrupt_loss(step, loss)
            self.scaler.scale(loss).backward()
            total_loss += loss.item()
        # Unscale before clipping so the threshold applies to the true gradient.
        self.scaler.unscale_(self.optimizer)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()
        if is_nonfinite(self, total_loss, grad_norm):
            self.scaler.update()   # no step: the update is skipped, the weights stay finite
            skip_update(self, total_loss, grad_norm)
        else:
            self._apply_update()
        self.optimizer.zero_grad(set_to_none=True)
        self.faults.after_step(step)
        self.state.step += 1
        return total_loss, grad_norm, lr

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

    def _after_step(self, bar: tqdm, loss: float, grad_norm: float, lr: float) -> None:
        cfg, state = self.cfg, self.state
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{self.tokens_per_s:,.0f}", refresh=False)
        if state.step % cfg.log_every == 0:
            self.recorder.log_step(state.step, {"loss": loss, "lr": lr, "grad_norm": grad_norm,
                                                "tokens_per_s": self.tokens_per_s, "epoch": state.epoch,
                                                "tokens_seen": state.tokens_seen})
        evaluated = state.step % cfg.eval_every == 0
        if evaluated:
            self._evaluate_and_report()
        epoch_ended = self._epoch_used_up()
        if epoch_ended:
            self._end_epoch()
        self._checkpoint_if_due(evaluated or epoch_ended, epoch_ended)
        clear_cache_if_due(self)
        if self.reload_after_streak:
            self.reload_after_streak = False
            reload_before_streak(self)

    def _epoch_used_up(self) -> bool:
        return self.state.sample_pos + self.cfg.effective_batch > self.steps_per_epoch * self.cfg.effective_batch

    def _end_epoch(self) -> None:
        state = self.state
        val_loss = self._evaluate_and_report()
        losses = [x for x in state.epoch_losses if math.isfinite(x)]
        seconds, tokens = state.epoch_seconds, state.sample_pos * self.cfg.block_size
        metrics = {
            "train_loss": float(np.mean(losses)) if losses else math.nan,
            "val_loss": val_loss, "val_ppl": _perplexity(val_loss),
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
            with self.placement.autocast():
                logits = self.model(input_ids=batch[:, :-1]).logits
            total += F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(),
                                     reduction="sum").item()
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
        self.recorder.log_eval(state.step, state.epoch, {"val_loss": val_loss, "val_ppl": _perplexity(val_loss)})
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

    def _halt_reason(self) -> str | None:
        if self.stops.requested:
            return "signal"
        if self.clock.remaining() <= self.time_needed():
            return "time"
        return None

    def time_needed(self) -> float:
        """Seconds one more step (with its evaluation, if due) and a checkpoint would take."""
        return self.clock.needed((self.state.step + 1) % self.cfg.eval_every == 0, self._checkpoint_bytes)



def _perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else math.inf

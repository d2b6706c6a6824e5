"""The training loop: optimizer steps, and what happens between two of them.

``Trainer.run_steps`` is the loop, over the parts trainer.setup built (the model, optimizer,
data and checkpoint store): the loop builds nothing. The optimizer step reads top to bottom in
trainer.step.train_step, which ``Trainer.optimizer_step`` runs on this rank's share of the
step's sequences (redone at a smaller micro-batch after an out-of-memory error); what
happens between two steps (logging, evaluation, epoch end, checkpoint, a reload after
non-finite steps) in ``Trainer._after_step``. Faults are
decided in trainer.faults, which returns what to do; the loop applies it. How a run
starts and ends (the recorder's row, final and emergency checkpoints, signals, the time
budget) is trainer.run, which drives this loop: the loop returns why it stopped and never
calls back.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from trainer.batching import Batching
from trainer.clock import StopClock
from trainer.data.batches import to_device
from trainer.data.text_measure import bits_per_byte, text_counts, word_perplexity
from trainer.distributed import agree_stop, copy_from_main, share, spread_from_main, step_seed, sum_over_ranks
from trainer.early_stop import EarlyStop, decide
from trainer.errors import StopTraining
from trainer.faults import count_nonfinite, oom_past_agreement, reload_before_streak, remedy_after_oom
from trainer.flops import utilisation
from trainer.gpu_monitor import GpuMonitor, gpu_epoch_metrics
from trainer.interrupts import StopRequests
from trainer.memory import clear_cache_if_due, epoch_memory, free_memory
from trainer.metrics import perplexity
from trainer.model import next_token_loss
from trainer.recorder import EVENT_SCALER_SKIP, Recorder
from trainer.rng import seed_device
from trainer.schedule import lr_at
from trainer.setup import RunParts, apply_gradient_checkpointing
from trainer.state import TrainState
from trainer.step import StepOutcome, with_micro_batch_retries

TIME = "time"     # a Halt's cause when the time budget or deadline is near
EARLY_STOP = "early_stop"   # a Halt's cause when --early-stop-patience is used up (trainer.early_stop)


@dataclass(frozen=True)
class Halt:
    """Why the steps stopped before the end."""

    cause: str               # TIME, EARLY_STOP, or the signal: "SIGTERM", "SIGINT", "KeyboardInterrupt"
    mid_step: bool = False   # cut inside a step: the weights and the data position disagree
    early_stop: EarlyStop | None = None   # with EARLY_STOP: the step stopped at and the best one


class StepResult(NamedTuple):
    loss: float
    grad_norm: float
    lr: float
    reload: bool             # a streak of non-finite steps calls for a reload (trainer.faults)


@dataclass(frozen=True)
class Evaluation:
    """One evaluation of the validation batches."""

    loss: float              # nats per token
    bpb: float               # bits per byte of their text: comparable across tokenizers (trainer.data.text_measure)
    word_ppl: float          # perplexity per word; NaN when the text has no words

    @classmethod
    def from_sums(cls, nats: float, tokens: float, n_bytes: float, words: float) -> "Evaluation":
        return cls(nats / tokens, bits_per_byte(nats, n_bytes), word_perplexity(nats, words))

    def metrics(self) -> dict[str, float]:
        """As the recorder gets them (log_eval, and in log_epoch's metrics)."""
        return {"val_loss": self.loss, "val_ppl": perplexity(self.loss), "val_bpb": self.bpb,
                "val_word_ppl": self.word_ppl}


class Trainer:
    """Steps one run's parts (built by trainer.setup) from its state to the end, or to a Halt."""

    def __init__(self, parts: RunParts, state: TrainState, recorder: Recorder, stops: StopRequests,
                 clock: StopClock, log=print, gpu_monitor: GpuMonitor | None = None):
        self.parts, self.state, self.recorder, self.log = parts, state, recorder, log
        self.stops, self.clock = stops, clock
        self.gpu_monitor = gpu_monitor      # samples on its own thread; the epoch end only reads it
        self.tokens_per_s = math.nan        # the last step's
        self.steps_taken = 0            # optimizer steps taken by this process (a step may be retaken)
        self._order: tuple[int, np.ndarray] | None = None     # (epoch, its order of the training blocks)

    @property
    def step_batch(self) -> int:
        """Sequences per optimizer step, all ranks together: micro-batch x accumulation x world size."""
        return self.state.batching.per_step

    # -- the steps ------------------------------------------------------------------------
    def run_steps(self) -> Halt | None:
        """Steps until the end (None), or until a signal or the time limit says stop (a Halt).

        Raises StopTraining when a recorder prunes the run or a fault ends it.
        """
        cfg = self.parts.cfg
        bar = tqdm(total=self.parts.total_steps, initial=self.state.step, unit="step", dynamic_ncols=True,
                   mininterval=1.0, disable=not (cfg.progress and self.parts.world.is_main))
        in_step = False
        try:
            while self.state.step < self.parts.total_steps and self.state.epoch < cfg.epochs:
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
                self._after_step_everywhere(bar, step)
                self.clock.record_step(time.perf_counter() - started)
                if stop := self._early_stop():
                    return Halt(EARLY_STOP, early_stop=stop)
        except KeyboardInterrupt:
            return Halt("KeyboardInterrupt", mid_step=in_step)
        finally:
            bar.close()
        return None

    def _next_sample_ids(self) -> np.ndarray:
        state = self.state
        if self._order is None or self._order[0] != state.epoch:
            self._order = (state.epoch, self.parts.train_blocks.epoch_order(self.parts.cfg.seed, state.epoch))
        return self._order[1][state.sample_pos:state.sample_pos + self.step_batch]

    def optimizer_step(self, sample_ids: np.ndarray) -> StepResult:
        """One optimizer step over len(sample_ids) sequences, all ranks' (trainer.step.train_step).

        Out of memory: the micro-batch is halved, or gradient checkpointing turned on, and the
        whole step redone (trainer.faults.remedy_after_oom).
        """
        parts, step = self.parts, self.state.step + 1
        lr = self._set_lr()
        mine = share(sample_ids, parts.world)           # this rank's part of the step's sequences

        def take(batching: Batching) -> StepOutcome:
            if parts.world.parallel and parts.cfg.dropout:   # each rank its own masks, a function of the step
                seed_device(parts.device, step_seed(parts.cfg.seed, parts.world, step))
            return parts.train_step(parts.step_parts, batching.micro_batches(mine), step)

        outcome = with_micro_batch_retries(take, self.state.batching, parts.world, self._after_oom,
                                           self._oom_past_agreement)
        reload = self._count_outcome(outcome)
        self.state.step += 1
        return StepResult(outcome.loss, outcome.grad_norm, lr, reload)

    def _set_lr(self) -> float:
        """Each param group's lr for this step, from its own peak (--lr, or --muon-lr for Muon's); --lr's."""
        cfg, total, step, scale = self.parts.cfg, self.parts.total_steps, self.state.step, self.state.lr_scale
        for group in self.parts.optimizer.param_groups:
            group["lr"] = lr_at(step, cfg, total, group["base_lr"]) * scale
        return lr_at(step, cfg, total) * scale

    def _count_outcome(self, outcome: StepOutcome) -> bool:
        """The state's and the recorder's record of a step taken; True when a streak of non-finite
        steps calls for a reload (trainer.faults)."""
        state = self.state
        if not outcome.updated:
            return count_nonfinite(state, outcome.loss, outcome.grad_norm, self.parts.cfg.max_nonfinite_steps,
                                   self.recorder)
        if outcome.scaler_skipped:
            state.scaler_skips += 1
            self.recorder.log_event(EVENT_SCALER_SKIP, state.step + 1,
                                    {"scale": self.parts.scaler.get_scale(), "total": state.scaler_skips})
        state.nonfinite_streak = 0
        return False

    def _after_oom(self, batching: Batching, error: str) -> Batching:
        """The batching to redo the step with (the next rung of trainer.faults' memory ladder)."""
        self.parts.optimizer.zero_grad(set_to_none=True)   # the failed step's half-accumulated gradients
        free_memory(self.parts.device)
        remedy = remedy_after_oom(batching.split, self.state.step + 1, error,
                                  checkpointing=self.parts.cfg.gradient_checkpointing,
                                  checkpointing_on=self.state.gradient_checkpointing,
                                  recorder=self.recorder, log=self.log)
        self.state.batching = Batching.of(remedy.split, batching.world_size)
        self.state.gradient_checkpointing = remedy.gradient_checkpointing
        apply_gradient_checkpointing(self.parts.model, self.state)
        self.state.oom_recoveries += 1
        return self.state.batching

    def _oom_past_agreement(self, batching: Batching, error: str) -> Exception:
        return oom_past_agreement(batching.split, self.state.step + 1, self.parts.world.rank, error,
                                  self.state.gradient_checkpointing)

    def _advance(self, n_samples: int, loss: float, seconds: float) -> None:
        state, block_size = self.state, self.parts.cfg.block_size
        state.sample_pos += n_samples
        state.tokens_seen += n_samples * block_size
        state.epoch_losses.append(loss)
        state.epoch_seconds += seconds
        self.tokens_per_s = n_samples * block_size / seconds

    def _after_step(self, bar: tqdm, step: StepResult) -> None:
        parts, cfg, state = self.parts, self.parts.cfg, self.state
        bar.update(1)
        if not bar.disable:      # formatting the postfix costs more than the bar itself
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
        clear_cache_if_due(state.step, cfg.clear_cache_every, parts.device)
        if step.reload:     # here, between steps, where the weights and the data position agree
            reloaded = reload_before_streak(state, parts.store, model=parts.model, optimizer=parts.optimizer,
                                            scaler=parts.scaler, recorder=self.recorder, log=self.log)
            # Rank 0 alone has the checkpoint store: every rank continues from what it reloaded.
            # A new state object: whoever reads the run's state after the steps reads self.state.
            self.state = copy_from_main(parts.world, parts.model, parts.optimizer, parts.scaler, reloaded)

    def _after_step_everywhere(self, bar: tqdm, step: StepResult) -> None:
        """_after_step; with several ranks, a stop that rank 0's recorder asked for (a study's
        pruner) ends every rank after this same step."""
        stop, world = None, self.parts.world
        try:
            self._after_step(bar, step)
        except StopTraining as exc:
            if not world.parallel:
                raise
            stop = (exc.status, exc.reason)
        stop = spread_from_main(world, stop, self.parts.device)
        if stop is not None:
            raise StopTraining(*stop)

    def _epoch_used_up(self) -> bool:
        return self.state.sample_pos + self.step_batch > self.parts.steps_per_epoch * self.step_batch

    def _end_epoch(self) -> None:
        parts, state = self.parts, self.state
        val = self._evaluate_and_report()
        losses = [x for x in state.epoch_losses if math.isfinite(x)]
        seconds, tokens = state.epoch_seconds, state.sample_pos * parts.cfg.block_size
        metrics = {
            "train_loss": float(np.mean(losses)) if losses else math.nan,
            **val.metrics(),
            "lr": parts.optimizer.param_groups[0]["lr"], "step": state.step,
            "epoch_seconds": seconds, "tokens_per_s": tokens / seconds if seconds > 0 else math.nan,
            "mfu": utilisation(parts.flops_per_token, tokens / seconds if seconds > 0 else math.nan,
                               parts.device, parts.world.size, parts.placement.autocast_dtype),
            **epoch_memory(parts.device),      # each epoch's own GPU peak
            # the samples since the last epoch end (None on the CPU, or when none fell in this epoch)
            **gpu_epoch_metrics(self.gpu_monitor.read() if self.gpu_monitor else {}),
        }
        epoch = state.epoch
        # The position moves first: an interruption after it never logs this epoch twice.
        state.epoch, state.sample_pos, state.epoch_losses, state.epoch_seconds = epoch + 1, 0, [], 0.0
        self.recorder.log_epoch(epoch, metrics)
        self.log(f"epoch {epoch}: train loss {metrics['train_loss']:.4f}, val loss {val.loss:.4f}, "
                 f"ppl {metrics['val_ppl']:.2f}, {val.bpb:.4f} bpb, {seconds:.1f} s")

    # -- evaluation -------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> Evaluation:
        """Mean validation loss per token over the fixed validation batches, shared by the ranks,
        and the bits per byte and word perplexity of the text their targets hold."""
        parts, model, device, world = self.parts, self.parts.model, self.parts.device, self.parts.world
        model.eval()
        # (loss summed over tokens, tokens, bytes, words) of the targets, all ranks' added up
        sums = torch.zeros(4, dtype=torch.float64, device=device)
        batches = parts.val_blocks.sequential(self.state.micro_batch, parts.cfg.eval_batches)
        for ids in batches[world.rank::world.size]:
            batch = to_device(parts.val_blocks.get(ids), device)
            sums[0] += next_token_loss(model, batch, parts.placement.autocast, reduction="sum")
            sums[1] += batch[:, 1:].numel()
            sums[2:] += text_counts(parts.token_text, batch)
        model.train()
        nats, tokens, n_bytes, words = sum_over_ranks(sums, world).tolist()   # one host sync per evaluation
        return Evaluation.from_sums(nats, tokens, n_bytes, words)

    def _evaluate_and_report(self) -> Evaluation:
        state = self.state
        if state.evaluated_now:         # this step was just evaluated
            return Evaluation(state.last_val_loss, state.last_val_bpb, state.last_val_word_ppl)
        started = time.perf_counter()
        val = self.evaluate()
        state.last_val_loss, state.last_val_bpb, state.last_val_word_ppl = val.loss, val.bpb, val.word_ppl
        state.last_eval_step = state.step
        state.eval_history.append((state.step, val.loss))
        if val.loss < state.best_val_loss:
            state.best_val_loss, state.best_val_bpb, state.best_step = val.loss, val.bpb, state.step
        seconds = time.perf_counter() - started
        state.epoch_seconds += seconds
        self.clock.record_eval(seconds)
        self.recorder.log_eval(state.step, state.epoch, val.metrics())
        return val

    # -- checkpoints and stopping ---------------------------------------------------------
    def _checkpoint_if_due(self, evaluated: bool, epoch_ended: bool) -> None:
        parts, cfg, state, store = self.parts, self.parts.cfg, self.state, self.parts.store
        if store is None:
            return
        store.prepare(parts.model, parts.optimizer)      # once: the buffers the first save copies into
        due = (cfg.save_every and state.step % cfg.save_every == 0) or epoch_ended or (cfg.save_on_eval and evaluated)
        # Early stopping exports the best checkpoint, so each new best is saved (rotation keeps it).
        due = due or bool(cfg.early_stop_patience and state.evaluated_now and state.best_step == state.step)
        if due and state.step < parts.total_steps:     # at the last step the final save follows
            kind = "best" if state.evaluated_now and state.best_step == state.step else "periodic"
            parts.save(kind, state, self.steps_taken)
        for saved in store.poll():
            self.clock.record_write(saved.seconds)

    def _early_stop(self) -> EarlyStop | None:
        """--early-stop-patience used up by an evaluation of this step, with steps left to save."""
        state, cfg = self.state, self.parts.cfg
        if state.last_eval_step != state.step or state.step >= self.parts.total_steps:
            return None
        return decide(state.eval_history, cfg.early_stop_patience, cfg.early_stop_min_delta)

    def _halt(self) -> Halt | None:
        """Stop before this step? With several ranks, rank 0's clock decides for the time limit,
        and a signal to any rank stops them all, after the same step."""
        world = self.parts.world
        time_up = world.is_main and self.clock.should_stop(self._eval_due_next(), self.parts.checkpoint_bytes)
        cause = agree_stop(world, self.stops.signal_name, TIME if time_up else None, (TIME,), self.parts.device)
        return Halt(cause) if cause else None

    def time_needed(self) -> float:
        """Seconds one more step (with its evaluation, if due) and a checkpoint would take."""
        return self.clock.needed(self._eval_due_next(), self.parts.checkpoint_bytes)

    def _eval_due_next(self) -> bool:
        return (self.state.step + 1) % self.parts.cfg.eval_every == 0

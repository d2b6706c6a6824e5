"""The training run: set up once, then epochs of optimizer steps, evaluations and saves.

``train(cfg, recorder)`` is the whole public surface. The optimizer step reads top to
bottom in ``Trainer.optimizer_step``.
"""
from __future__ import annotations

import math
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from trainer.batches import PackedBlocks
from trainer.checkpoint import TrainState, load_checkpoint, save_checkpoint
from trainer.config import TrainConfig
from trainer.data import PreparedData, prepare_data
from trainer.device import Placement, memory_snapshot, place
from trainer.errors import DataError, StopTraining
from trainer.export import export_hf
from trainer.model import build_model, build_optimizer, count_parameters
from trainer.recorder import NullRecorder, Recorder, RunInfo
from trainer.schedule import lr_at


@dataclass(frozen=True)
class RunResult:
    run_id: int
    status: str                  # completed, pruned, interrupted
    reason: str | None
    steps: int
    best_val_loss: float
    last_val_loss: float
    tokens_per_s: float
    out_dir: str
    final_checkpoint: str | None
    final_model: str | None


def train(cfg: TrainConfig, recorder: Recorder | None = None, *, data: PreparedData | None = None,
          resume: str | None = None, log=print) -> RunResult:
    """Train one model as ``cfg`` says; report everything to ``recorder``."""
    cfg.check()
    placement = place(cfg)
    data = data or prepare_data(cfg, log=log)
    trainer = Trainer(cfg, data, placement, recorder or NullRecorder(), log=log)
    if resume:
        trainer.restore(resume)
    return trainer.fit()


class Trainer:
    def __init__(self, cfg: TrainConfig, data: PreparedData, placement: Placement,
                 recorder: Recorder, log=print):
        self.cfg, self.data, self.placement, self.recorder, self.log = cfg, data, placement, recorder, log
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
        self.resumed_from: str | None = None
        self._tokens_per_s = math.nan

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
    def restore(self, path: str) -> None:
        self.state, _ = load_checkpoint(Path(path), model=self.model, optimizer=self.optimizer,
                                        scaler=self.scaler)
        self.resumed_from = str(path)
        self.log(f"resumed from {path} at step {self.state.step} "
                 f"(epoch {self.state.epoch}, {self.state.sample_pos} sequences into it)")

    # -- the run ----------------------------------------------------------------------
    def fit(self) -> RunResult:
        self._start_run()
        status, reason = "completed", None
        try:
            self._train_epochs()
        except StopTraining as stop:
            status, reason = stop.status, stop.reason
            self.log(f"run stopped: {status} ({reason})")
        except KeyboardInterrupt:
            self.recorder.finish("interrupted", "KeyboardInterrupt")
            raise
        except BaseException as exc:
            self.recorder.finish("failed", f"{type(exc).__name__}: {exc}")
            raise
        final_ckpt, final_model = self._save_final(status)
        self.recorder.finish(status, reason)
        return RunResult(self.state.run_id or 0, status, reason, self.state.step, self.state.best_val_loss,
                         self.state.last_val_loss, self._tokens_per_s, str(self.out_dir),
                         final_ckpt, final_model)

    def _start_run(self) -> None:
        cfg, data = self.cfg, self.data
        extra = {"steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps}
        if self.resumed_from:
            extra.update(run_id=self.state.run_id, resume_step=self.state.step, resumed_from=self.resumed_from)
        info = RunInfo(
            name=cfg.run_name or Path(cfg.out_dir).name, config=cfg.to_dict(),
            dataset=data.dataset_identity, tokenizer=data.tokenizer_identity,
            n_params=count_parameters(self.model), device=self.placement.description,
            precision=self.placement.precision, host=socket.gethostname(), extra=extra)
        self.state.run_id = self.recorder.start_run(info)
        self.log(f"run {self.state.run_id}: {info.n_params:,} parameters on {info.device}, "
                 f"{self.placement.precision}; {self.total_steps} optimizer steps of "
                 f"{cfg.effective_batch} x {cfg.block_size} tokens")

    def _train_epochs(self) -> None:
        bar = tqdm(total=self.total_steps, initial=self.state.step, unit="step", dynamic_ncols=True,
                   disable=not (self.cfg.progress and self.is_main))
        try:
            while self.state.epoch < self.cfg.epochs and self.state.step < self.total_steps:
                self._train_epoch(bar)
        finally:
            bar.close()

    def _train_epoch(self, bar: tqdm) -> None:
        cfg, state = self.cfg, self.state
        order = self.train_blocks.epoch_order(cfg.seed, state.epoch)
        epoch_start, epoch_tokens = time.perf_counter(), 0
        while state.sample_pos + cfg.effective_batch <= self.steps_per_epoch * cfg.effective_batch:
            if state.step >= self.total_steps:
                return
            sample_ids = order[state.sample_pos:state.sample_pos + cfg.effective_batch]
            t0 = time.perf_counter()
            loss, grad_norm, lr = self.optimizer_step(sample_ids)
            seconds = time.perf_counter() - t0
            state.sample_pos += len(sample_ids)
            state.tokens_seen += len(sample_ids) * cfg.block_size
            epoch_tokens += len(sample_ids) * cfg.block_size
            state.epoch_losses.append(loss)
            self._tokens_per_s = len(sample_ids) * cfg.block_size / seconds
            self._after_step(bar, loss, grad_norm, lr)
        self._end_epoch(time.perf_counter() - epoch_start, epoch_tokens)

    def optimizer_step(self, sample_ids: np.ndarray) -> tuple[float, float, float]:
        """One optimizer step over len(sample_ids) sequences; returns (loss, grad norm, lr)."""
        cfg, model = self.cfg, self.model
        lr = lr_at(self.state.step, cfg, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        micro_batches = np.array_split(sample_ids, len(sample_ids) // self.state.micro_batch)
        total_loss = 0.0
        for ids in micro_batches:
            batch = self.train_blocks.get(ids).to(self.device, non_blocking=True)  # (B, T+1)
            inputs, targets = batch[:, :-1], batch[:, 1:]
            with self.placement.autocast():
                logits = model(input_ids=inputs).logits                           # (B, T, vocab)
            # The loss in fp32 whatever the autocast dtype; averaged over the micro-batches.
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()) / len(micro_batches)
            self.scaler.scale(loss).backward()
            total_loss += loss.item()
        # Unscale before clipping so the threshold applies to the true gradient.
        self.scaler.unscale_(self.optimizer)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        return total_loss, grad_norm, lr

    def _after_step(self, bar: tqdm, loss: float, grad_norm: float, lr: float) -> None:
        cfg, step = self.cfg, self.state.step
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{self._tokens_per_s:,.0f}", refresh=False)
        if step % cfg.log_every == 0:
            self.recorder.log_step(step, {"loss": loss, "lr": lr, "grad_norm": grad_norm,
                                          "tokens_per_s": self._tokens_per_s, "epoch": self.state.epoch,
                                          "tokens_seen": self.state.tokens_seen})
        if step % cfg.eval_every == 0:
            self._evaluate_and_report()
        if cfg.save_every and step % cfg.save_every == 0:
            self._save("periodic")

    def _end_epoch(self, seconds: float, tokens: int) -> None:
        state = self.state
        val_loss = self._evaluate_and_report(end_of_epoch=True)
        losses = [x for x in state.epoch_losses if math.isfinite(x)]
        metrics = {
            "train_loss": float(np.mean(losses)) if losses else math.nan,
            "val_loss": val_loss, "val_ppl": _perplexity(val_loss),
            "lr": self.optimizer.param_groups[0]["lr"], "step": state.step,
            "epoch_seconds": seconds, "tokens_per_s": tokens / seconds if seconds > 0 else math.nan,
            **memory_snapshot(self.device),
        }
        self.recorder.log_epoch(state.epoch, metrics)
        self.log(f"epoch {state.epoch}: train loss {metrics['train_loss']:.4f}, val loss {val_loss:.4f}, "
                 f"ppl {metrics['val_ppl']:.2f}, {seconds:.1f} s")
        state.epoch += 1
        state.sample_pos = 0
        state.epoch_losses = []

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

    def _evaluate_and_report(self, end_of_epoch: bool = False) -> float:
        state = self.state
        if end_of_epoch and state.step % self.cfg.eval_every == 0 and math.isfinite(state.last_val_loss):
            return state.last_val_loss  # this step was just evaluated
        val_loss = self.evaluate()
        state.last_val_loss = val_loss
        if val_loss < state.best_val_loss:
            state.best_val_loss, state.best_step = val_loss, state.step
        self.recorder.log_eval(state.step, state.epoch, {"val_loss": val_loss, "val_ppl": _perplexity(val_loss)})
        return val_loss

    # -- saving -----------------------------------------------------------------------
    def _save(self, kind: str) -> str | None:
        if not self.is_main:
            return None
        path = self.out_dir / "checkpoints" / f"step-{self.state.step:07d}"
        saved = save_checkpoint(path, model=self.model, optimizer=self.optimizer, scaler=self.scaler,
                                state=self.state, config=self.cfg.to_dict(), kind=kind)
        val = self.state.last_val_loss if math.isfinite(self.state.last_val_loss) else None
        self.recorder.log_checkpoint(str(saved.path.resolve()), kind, self.state.step, val,
                                     saved.size_bytes, saved.sha256)
        return str(saved.path)

    def _save_final(self, status: str) -> tuple[str | None, str | None]:
        if not self.is_main or self.state.step == 0:
            return None, None
        checkpoint = self._save("final")
        if status != "completed":
            return checkpoint, None
        model_dir = export_hf(self.model, self.data.tokenizer, self.cfg, self.out_dir / "final_model")
        self.log(f"final model: {model_dir}")
        return checkpoint, str(model_dir)


def _perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else math.inf

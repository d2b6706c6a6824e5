"""Every way a run ends, after its steps (trainer.run drives them; its docstring lists the ends):
the final checkpoint and final_model/, the emergency checkpoint of a signal or the time limit,
early stopping's export of the best weights, a full disk that stops the run interrupted, and
the RunResult. Each function takes the ``Run``: the run's parts, the state the steps ended
with, and who hears of it; none takes the loop.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NoReturn

from trainer.checkpoints import CheckpointStore, ResumePlan, load_checkpoint, scan
from trainer.clock import StopClock
from trainer.early_stop import EarlyStop
from trainer.errors import EXIT_SIGNALS, CheckpointError, TrainingInterrupted
from trainer.export import export_hf
from trainer.files import free_bytes, json_float
from trainer.interrupts import StopRequests
from trainer.loop import Halt, Trainer
from trainer.recorder import EVENT_CHECKPOINT_FAILED, EVENT_EARLY_STOP, EVENT_SIGNAL, EVENT_TIME_BUDGET, Recorder
from trainer.run_file import write_run_file
from trainer.setup import RunParts
from trainer.state import TrainState


@dataclass(frozen=True)
class RunResult:
    run_id: int
    status: str                  # completed, pruned, failed (diverged, OOM at micro-batch 1), interrupted (time)
    reason: str | None
    steps: int
    best_val_loss: float
    last_val_loss: float
    tokens_per_s: float
    out_dir: str
    final_checkpoint: str | None  # the newest checkpoint: to resume from, or to export
    final_model: str | None
    resumed_from: str | None = None
    best_val_bpb: float = math.nan   # bits per byte at the best val_loss's step; NaN when never evaluated


@dataclass(frozen=True)
class Run:
    """What a run's start and its ending use: its parts, where the loop has it, and who hears of it.

    Taken from the loop (``of``) before the steps, and again once they end, however they end:
    a reload after a streak of non-finite steps gives the loop a new state object
    (trainer.faults.reload_before_streak), so the ending reads the state the steps ended with.
    """

    parts: RunParts
    state: TrainState
    steps_taken: int             # the loop's optimizer steps: they order the saves of this process
    tokens_per_s: float          # the last step's; NaN before one
    recorder: Recorder
    log: Callable[[str], None]
    stops: StopRequests
    clock: StopClock
    plan: ResumePlan

    @classmethod
    def of(cls, loop: Trainer, plan: ResumePlan) -> "Run":
        return cls(loop.parts, loop.state, loop.steps_taken, loop.tokens_per_s, loop.recorder, loop.log,
                   loop.stops, loop.clock, plan)

    @property
    def store(self) -> CheckpointStore | None:
        return self.parts.store

    def save(self, kind: str) -> str | None:
        """Start writing a checkpoint of the state (main process only); its path."""
        return self.parts.save(kind, self.state, self.steps_taken)

    def write_run_file(self, status: str) -> None:
        """The folder's run.json (trainer.run_file): rank 0 alone writes it."""
        if self.parts.world.is_main:
            write_run_file(self.parts.out_dir, self.state.run_uid, self.state.run_id, status, self.log)


def finish(run: Run, status: str, reason: str | None) -> RunResult:
    """The end of a run that ran its course (completed), or that a fault or pruner ended."""
    try:
        checkpoint, model_dir = _save_final(run, status)
    except (CheckpointError, OSError) as exc:
        if status == "completed":
            raise          # to be continued once there is room: stop_on_full_disk
        run.log(f"warning: the final checkpoint could not be written ({exc}); the run ends {status} as it was")
        checkpoint, model_dir = complete_saves(run), None
    end_row(run, status, reason)
    if run.stops.requested:
        run.log(f"{run.stops.signal_name} arrived while the run was finishing; it is complete")
    return _result(run, status, reason, checkpoint, model_dir)


def stop_on_full_disk(run: Run, end: Callable[[], RunResult]) -> RunResult:
    """``end()``, unless the final checkpoint or final_model/ cannot be written (a full disk, or
    any OS error of the output folder): then the run stops interrupted at its newest complete
    checkpoint, to be continued with --resume auto once there is room. Nothing trained is lost
    beyond the steps since that checkpoint."""
    try:
        return end()
    except (CheckpointError, OSError) as exc:
        error = exc
    path = complete_saves(run)
    free = free_bytes(run.parts.out_dir)
    reason = (f"the final checkpoint or model could not be written ({error}"
              + (f"; {free / 1e9:.2f} GB free" if free is not None else "") + "); free space, or need less "
              "(--keep-checkpoints, --save-optimizer-state false), and continue with --resume auto")
    _event(run, EVENT_CHECKPOINT_FAILED, {"error": str(error), "free_bytes": free, "checkpoint": path})
    run.log(f"stopped at step {run.state.step}: {reason}")
    end_row(run, "interrupted", reason)
    return _result(run, "interrupted", reason, path, None)


def stop_for_signal(run: Run, halt: Halt) -> NoReturn:
    """Emergency checkpoint (unless a step was cut in half), finish the run, raise."""
    path = complete_saves(run, None if halt.mid_step else run.save("emergency"))
    _event(run, EVENT_SIGNAL, {"signal": halt.cause, "checkpoint": path})
    run.log(f"{halt.cause}: stopped at step {run.state.step}" + (f"; resume from {path}" if path else ""))
    end_row(run, "interrupted", f"signal {halt.cause}")
    raise TrainingInterrupted(halt.cause, path, EXIT_SIGNALS.get(halt.cause, 130))


def stop_for_time(run: Run, needed: float) -> RunResult:
    """Emergency checkpoint, finish the run interrupted: ``needed`` seconds (one more step and a
    checkpoint, trainer.loop.Trainer.time_needed) are more than the limit leaves."""
    remaining, total = run.clock.remaining(), run.parts.total_steps
    path = complete_saves(run, run.save("emergency"))
    reason = (f"time budget: stopped at step {run.state.step} of {total} with {max(remaining, 0):.0f} s "
              f"left, as one more step and a checkpoint need {needed:.0f} s")
    _event(run, EVENT_TIME_BUDGET, {"limit_s": run.clock.limit_s, "remaining_s": remaining, "needed_s": needed,
                                    "checkpoint": path})
    run.log(f"{reason}; continue with --resume auto")
    end_row(run, "interrupted", reason)
    return _result(run, "interrupted", reason, path, None)


def stop_early(run: Run, stop: EarlyStop) -> RunResult:
    """Completed: the last step's checkpoint, and final_model/ from the best one's weights."""
    parts, total = run.parts, run.parts.total_steps
    checkpoint, best, model_dir = _final_checkpoint(run), _best_checkpoint(run.store, stop.best_step), None
    if checkpoint is not None:
        if best is not None:
            load_checkpoint(best, model=parts.model, optimizer=None, scaler=parts.scaler)   # the run is over
        else:
            run.log(f"warning: no checkpoint of step {stop.best_step} is left; final_model/ holds the last weights")
        model_dir = str(export_hf(parts.model, parts.data.tokenizer, parts.cfg, parts.out_dir / "final_model"))
    _event(run, EVENT_EARLY_STOP, {"best_step": stop.best_step, "best_val_loss": json_float(stop.best_val_loss),
                                   "patience": parts.cfg.early_stop_patience,
                                   "min_delta": parts.cfg.early_stop_min_delta,
                                   "evals_without_improvement": stop.evals_without_improvement,
                                   "steps_saved": total - stop.step, "total_steps": total,
                                   "best_checkpoint": best, "final_model": model_dir})
    run.log(f"{stop.reason}: {total - stop.step} of {total} steps saved; "
            f"final model (weights of step {stop.best_step}): {model_dir}")
    end_row(run, "completed", stop.reason)
    return _result(run, "completed", stop.reason, checkpoint, model_dir)


def end_row(run: Run, status: str, reason: str | None) -> None:
    """End the run's row in the recorder, and in this folder's run file."""
    run.recorder.finish(status, reason)
    run.write_run_file(status)


def _best_checkpoint(store: CheckpointStore | None, step: int) -> str | None:
    """The path of this run's checkpoint of ``step`` (saved at each new best, never rotated away)."""
    if store is None:
        return None
    return next((str(c.path) for c in scan(store.root) if c.step == step), None)


def _save_final(run: Run, status: str) -> tuple[str | None, str | None]:
    checkpoint = _final_checkpoint(run)
    if checkpoint is None or status != "completed":
        return checkpoint, None
    parts = run.parts
    model_dir = export_hf(parts.model, parts.data.tokenizer, parts.cfg, parts.out_dir / "final_model")
    run.log(f"final model: {model_dir}")
    return checkpoint, str(model_dir)


def _final_checkpoint(run: Run) -> str | None:
    """Write the last step's checkpoint and wait for it (main process, after a step)."""
    if run.store is None or run.state.step == 0:
        return None
    checkpoint = run.save("final")
    run.store.drain()
    return checkpoint


def complete_saves(run: Run, path: str | None = None) -> str | None:
    """Wait for the write in flight; return the newest complete checkpoint's path."""
    if run.store is None:
        return path
    try:
        run.store.drain()
    except Exception as exc:   # that write failed; an older checkpoint is still complete
        run.log(f"warning: {exc}")
    return run.store.latest_path


def _event(run: Run, kind: str, detail: dict) -> None:
    if run.store is not None:
        run.store.event(kind, run.state.step, detail)


def _result(run: Run, status: str, reason: str | None, checkpoint: str | None,
            model_dir: str | None) -> RunResult:
    s, plan = run.state, run.plan
    return RunResult(s.run_id or 0, status, reason, s.step, s.best_val_loss, s.last_val_loss,
                     run.tokens_per_s, str(run.parts.out_dir), checkpoint, model_dir,
                     str(plan.path) if plan.path else None, s.best_val_bpb)

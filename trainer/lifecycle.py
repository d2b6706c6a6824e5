"""A run around its training loop: the recorder's row, and every way a run ends.

- completed or pruned (a recorder raised StopTraining): final checkpoint, ``final_model/``
  when completed, ``finish``, a RunResult;
- --time-budget/--deadline near: emergency checkpoint, ``finish("interrupted")``, a
  RunResult with status ``interrupted`` (no exception: a study continues the trial later);
- SIGINT/SIGTERM/KeyboardInterrupt: emergency checkpoint, ``finish("interrupted")``, then
  ``TrainingInterrupted`` with the exit code for the command line;
- any other exception: the checkpoint in flight is completed, ``finish("failed")``, re-raised.
"""
from __future__ import annotations

import dataclasses
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.errors import EXIT_SIGNALS, StopTraining, TrainingInterrupted
from trainer.export import export_hf
from trainer.model import count_parameters
from trainer.recorder import EVENT_SIGNAL, EVENT_TIME_BUDGET, RunInfo
from trainer.resume import report_resume

if TYPE_CHECKING:
    from trainer.loop import Trainer


@dataclass(frozen=True)
class RunResult:
    run_id: int
    status: str                  # completed, pruned, interrupted (time budget)
    reason: str | None
    steps: int
    best_val_loss: float
    last_val_loss: float
    tokens_per_s: float
    out_dir: str
    final_checkpoint: str | None  # the newest checkpoint: to resume from, or to export
    final_model: str | None
    resumed_from: str | None = None


def run(t: "Trainer") -> RunResult:
    start_run(t)
    status, reason, halt = "completed", None, None
    try:
        halt = t.train_steps()
    except StopTraining as stop:
        status, reason = stop.status, stop.reason
        t.log(f"run stopped: {status} ({reason})")
    except KeyboardInterrupt:
        halt = "KeyboardInterrupt"
    except BaseException as exc:
        complete_saves(t)
        t.recorder.finish("failed", f"{type(exc).__name__}: {exc}")
        raise
    if halt == "time":
        return stop_for_time(t)
    if halt is not None:
        stop_for_signal(t, t.stops.signal_name if halt == "signal" else halt)
    checkpoint, model_dir = save_final(t, status)
    t.recorder.finish(status, reason)
    if t.stops.requested:
        t.log(f"{t.stops.signal_name} arrived while the run was finishing; it is complete")
    return result(t, status, reason, checkpoint, model_dir)


def start_run(t: "Trainer") -> None:
    """Create the recorder's run, or continue the checkpoint's run when resuming."""
    cfg, data, state = t.cfg, t.data, t.state
    extra = {"steps_per_epoch": t.steps_per_epoch, "total_steps": t.total_steps}
    if t.plan.path is not None:
        extra.update(run_id=state.run_id, resume_step=state.step, resumed_from=str(t.plan.path))
    info = RunInfo(
        name=cfg.run_name or Path(cfg.out_dir).name, config=cfg.to_dict(),
        dataset=data.dataset_identity, tokenizer=data.tokenizer_identity,
        n_params=count_parameters(t.model), device=t.placement.description,
        precision=t.placement.precision, host=socket.gethostname(), extra=extra)
    try:
        state.run_id = t.recorder.start_run(info)
    except LookupError:     # a checkpoint from another database (say, an earlier Kaggle session)
        t.log(f"run {state.run_id} is not in this database; recording the resumed run as a new run")
        extra = {k: v for k, v in extra.items() if k not in ("run_id", "resume_step")}
        state.run_id = t.recorder.start_run(dataclasses.replace(info, extra=extra))
    if t.store:
        t.store.set_run_id(state.run_id)
        report_resume(t.plan, t.store, state.step, t.resume_notes, t.log)
        t.store.reconcile()
    t.log(f"run {state.run_id}: {info.n_params:,} parameters on {info.device}, {t.placement.precision}; "
          f"{t.total_steps} optimizer steps of {cfg.effective_batch} x {cfg.block_size} tokens")


def stop_for_signal(t: "Trainer", name: str) -> None:
    """Emergency checkpoint (unless a step was cut in half), finish the run, raise."""
    path = complete_saves(t, None if t.in_step else t.save("emergency"))
    step = t.state.step
    event(t, EVENT_SIGNAL, {"signal": name, "checkpoint": path})
    t.log(f"{name}: stopped at step {step}" + (f"; resume from {path}" if path else ""))
    t.recorder.finish("interrupted", f"signal {name}")
    raise TrainingInterrupted(name, path, EXIT_SIGNALS.get(name, 130))


def stop_for_time(t: "Trainer") -> RunResult:
    remaining, needed = t.clock.remaining(), t.time_needed()
    path = complete_saves(t, t.save("emergency"))
    reason = (f"time budget: stopped at step {t.state.step} of {t.total_steps} with {max(remaining, 0):.0f} s "
              f"left, as one more step and a checkpoint need {needed:.0f} s")
    event(t, EVENT_TIME_BUDGET, {"limit_s": t.clock.limit_s, "remaining_s": remaining, "needed_s": needed,
                                 "checkpoint": path})
    t.log(f"{reason}; continue with --resume auto")
    t.recorder.finish("interrupted", reason)
    return result(t, "interrupted", reason, path, None)


def save_final(t: "Trainer", status: str) -> tuple[str | None, str | None]:
    if t.store is None or t.state.step == 0:
        return None, None
    checkpoint = t.save("final")
    t.store.drain()
    if status != "completed":
        return checkpoint, None
    model_dir = export_hf(t.model, t.data.tokenizer, t.cfg, t.out_dir / "final_model")
    t.log(f"final model: {model_dir}")
    return checkpoint, str(model_dir)


def complete_saves(t: "Trainer", path: str | None = None) -> str | None:
    """Wait for the write in flight; return the newest complete checkpoint's path."""
    if t.store is None:
        return path
    try:
        t.store.drain()
    except Exception as exc:   # that write failed; an older checkpoint is still complete
        t.log(f"warning: {exc}")
    return t.store.latest_path


def event(t: "Trainer", kind: str, detail: dict) -> None:
    if t.store is not None:
        t.store.event(kind, t.state.step, detail)


def result(t: "Trainer", status: str, reason: str | None, checkpoint: str | None,
           model_dir: str | None) -> RunResult:
    s = t.state
    return RunResult(s.run_id or 0, status, reason, s.step, s.best_val_loss, s.last_val_loss,
                     t.tokens_per_s, str(t.out_dir), checkpoint, model_dir,
                     str(t.plan.path) if t.plan.path else None)

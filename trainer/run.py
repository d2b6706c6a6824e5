"""A run from start to end: ``train()``, the recorder's row, and every way a run ends.

``train`` checks what it can before any work (config, device, the checkpoint to resume
from), prepares the data, sets the run up (trainer.setup: its parts, and the state it starts
from), drives the loop over them (trainer.loop.Trainer), and ends the run as the loop's
outcome says:

- completed, pruned (a recorder raised StopTraining) or failed by a fault the loop could
  not recover from (diverged; out of memory at micro-batch 1): final checkpoint,
  ``final_model/`` when completed, ``finish``, a RunResult with that status;
- early stop (--early-stop-patience used up): final checkpoint, ``final_model/`` from the
  best checkpoint's weights (not the last), an ``early_stop`` event, ``finish("completed",
  "early stop at step S (best at step B)")``;
- --time-budget/--deadline near: emergency checkpoint, ``finish("interrupted")``, a
  RunResult with status ``interrupted`` (no exception: a study continues the trial later);
- SIGINT/SIGTERM/KeyboardInterrupt: emergency checkpoint, ``finish("interrupted")``, then
  ``TrainingInterrupted`` with the exit code for the command line;
- any other exception: the checkpoint in flight is completed, ``finish("failed")``, re-raised
  (a lost rank of a data-parallel run, wherever it surfaced, as ``RankLost``).

Control runs one way: run -> loop -> faults. The loop returns why it stopped (a Halt) or
raises StopTraining; it never calls back into this module.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NoReturn

from trainer.checkpoints import CheckpointStore, ResumePlan, load_checkpoint, plan_resume, report_resume, scan
from trainer.clock import SimulatedTime, StopClock
from trainer.config import TrainConfig
from trainer.data import PreparedData, prepare_data
from trainer.device import place
from trainer.distributed import World, from_main, join, peer_failure, run_gpus
from trainer.errors import EXIT_SIGNALS, CheckpointError, StopTraining, TrainingInterrupted
from trainer.export import export_hf
from trainer.files import atomic_write_json, free_bytes, json_float, pid_alive
from trainer.gpu_monitor import GpuMonitor, start_gpu_monitor
from trainer.interrupts import StopRequests
from trainer.early_stop import EarlyStop
from trainer.loop import EARLY_STOP, TIME, Halt, Trainer
from trainer.model import count_parameters
from trainer.recorder import (EVENT_CHECKPOINT_FAILED, EVENT_EARLY_STOP, EVENT_SIGNAL, EVENT_TIME_BUDGET, NullRecorder,
                              Recorder, RunInfo)
from trainer.setup import RunParts, setup
from trainer.state import TrainState

# NVML's utilisation is the busy fraction of its last 1/6 to 1 s: a sample every 2 s sees a
# 10-second epoch five times, for four NVML calls per GPU on the monitor's own thread.
GPU_SAMPLE_S = 2.0
RUN_FILE = "run.json"      # in --out: the folder's run (uid, row id, status, process), for the next start
StartGpuMonitor = Callable[[float, tuple[int, ...]], tuple[GpuMonitor | None, str | None]]


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


def train(cfg: TrainConfig, recorder: Recorder | None = None, *, data: PreparedData | None = None,
          resume: str | None = None, log=print, time_source: SimulatedTime | None = None,
          gpu_monitor: StartGpuMonitor = start_gpu_monitor) -> RunResult:
    """Train one model as ``cfg`` says; report everything to ``recorder``.

    ``resume`` overrides ``cfg.resume``; ``time_source`` is the clock that --time-budget and
    --deadline are measured on (simulated in tests, see trainer.clock; None: real time).
    ``gpu_monitor(interval_s, gpus)`` starts the sampling of the run's GPUs (empty on the CPU)
    and returns (monitor or None, a note why not); NVML's by default, fixed samples in tests.

    Returns a RunResult with status completed, pruned, failed or interrupted (time budget or
    deadline). Raises ConfigError, DataError or CheckpointError for bad input before the
    first step; TrainingInterrupted after a signal, once the emergency checkpoint is complete
    (see trainer.errors for the exit codes); any other exception after the run is recorded
    as failed.
    """
    if resume is not None:
        cfg = cfg.replace(resume=str(resume))
    cfg.check()
    clock = StopClock.for_limits(cfg.time_budget, cfg.deadline, time_source)   # the budget counts from here
    placement = place(cfg)               # torchrun: this rank's own GPU, selected before it is asked anything
    placement.apply()                    # process-wide backend settings (TF32 on Ampere+ in fp32)
    world, placement = join(placement)   # torchrun: the process group, and the rank in the device line
    # Before the data: a bad --resume answers at once. Rank 0 decides; every rank resumes from it.
    plan = from_main(world, lambda: plan_resume(cfg))
    data = data or prepare_data(cfg, log=log)
    if not world.is_main:                # rank 0 alone records and reports
        recorder, log = NullRecorder(), _quiet
    recorder = recorder or NullRecorder()
    with StopRequests().installed() as stops, _sampling_gpus(placement.device, world, gpu_monitor, log) as gpus:
        parts, state, notes = setup(cfg, data, placement, world, recorder, log, plan)
        loop = Trainer(parts, state, recorder, stops, clock, log=log, gpu_monitor=gpus)
        return _drive(loop, plan, notes)


def _quiet(*_: object) -> None:
    """The log of ranks other than 0: their lines would repeat rank 0's."""


@contextmanager
def _sampling_gpus(device, world: World, start: StartGpuMonitor, log) -> Iterator[GpuMonitor | None]:
    """The run's GPUs sampled on the monitor's own thread until the run ends, however it ends
    (rank 0 alone: it alone reports the epochs); the note of why not, once, where they are not."""
    if not world.is_main:
        yield None
        return
    monitor, note = start(GPU_SAMPLE_S, run_gpus(device, world))
    if note:
        log(note)
    try:
        yield monitor
    finally:
        if monitor is not None:
            monitor.stop()


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


def _drive(loop: Trainer, plan: ResumePlan, notes: list[str]) -> RunResult:
    """Start the run's row, run the steps, and end the run as they ended."""
    _start(Run.of(loop, plan), notes)
    status, reason, halt = "completed", None, None
    try:
        halt = loop.run_steps()
    except StopTraining as stop:
        status, reason = stop.status, stop.reason
        loop.log(f"run stopped: {status} ({reason})")
    except BaseException as exc:
        run = Run.of(loop, plan)
        lost = peer_failure(exc, run.parts.world)
        if lost is not None:     # torchrun SIGTERMs the survivors: record the failure and say why first
            run.stops.ignore_from_now()
        _complete_saves(run)
        failure = lost or exc
        _end_row(run, "failed", f"{type(failure).__name__}: {failure}")
        if lost is not None and lost is not exc:
            raise lost from exc
        raise
    run = Run.of(loop, plan)
    if halt is not None and halt.cause == TIME:
        return _stop_for_time(run, loop.time_needed())
    if halt is not None and halt.cause == EARLY_STOP:
        return _stop_on_full_disk(run, lambda: _stop_early(run, halt.early_stop))
    if halt is not None:
        _stop_for_signal(run, halt)
    return _stop_on_full_disk(run, lambda: _finish(run, status, reason))


def _finish(run: Run, status: str, reason: str | None) -> RunResult:
    """The end of a run that ran its course (completed), or that a fault or pruner ended."""
    try:
        checkpoint, model_dir = _save_final(run, status)
    except (CheckpointError, OSError) as exc:
        if status == "completed":
            raise          # to be continued once there is room: _stop_on_full_disk
        run.log(f"warning: the final checkpoint could not be written ({exc}); the run ends {status} as it was")
        checkpoint, model_dir = _complete_saves(run), None
    _end_row(run, status, reason)
    if run.stops.requested:
        run.log(f"{run.stops.signal_name} arrived while the run was finishing; it is complete")
    return _result(run, status, reason, checkpoint, model_dir)


def _start(run: Run, notes: list[str]) -> None:
    """Create the recorder's run, or continue the checkpoint's run when resuming."""
    parts, state, plan, log = run.parts, run.state, run.plan, run.log
    cfg, data = parts.cfg, parts.data
    uid, taken_over = _run_identity(run)
    extra = {"steps_per_epoch": parts.steps_per_epoch, "total_steps": parts.total_steps}
    if uid is not None:
        extra["run_uid"] = uid
    if plan.path is not None:
        extra.update(run_id=state.run_id, resume_step=state.step, resumed_from=str(plan.path))
    elif taken_over:       # killed before its first checkpoint: its row is this run's, from step 0
        extra.update(resume_step=0)
        log(f"the run recorded in {parts.out_dir / RUN_FILE} was left running by a process that is gone, before "
            "its first checkpoint: continuing its row from step 0")
    info = RunInfo(
        name=cfg.run_name or Path(cfg.out_dir).name, config=cfg.to_dict(),
        dataset=data.dataset_identity, tokenizer=data.tokenizer_identity,
        n_params=count_parameters(parts.model), device=parts.placement.description,
        precision=parts.placement.precision, host=socket.gethostname(), extra=extra)
    try:
        state.run_id = run.recorder.start_run(info)
    except LookupError:     # a checkpoint from another database (say, an earlier Kaggle session)
        log(f"run {state.run_id} is not in this database; recording the resumed run as a new run")
        extra = {k: v for k, v in extra.items() if k not in ("run_id", "resume_step")}
        state.run_id = run.recorder.start_run(dataclasses.replace(info, extra=extra))
    state.run_uid = uid
    _write_run_file(run, "running")
    if run.store:
        run.store.set_run_id(state.run_id)
        report_resume(plan, run.store, state.step, notes, log)
        run.store.reconcile()
    log(f"run {state.run_id}: {info.n_params:,} parameters on {info.device}, {parts.placement.precision}; "
        f"{parts.total_steps} optimizer steps of {state.batching.per_step} x {cfg.block_size} tokens")


def _stop_on_full_disk(run: Run, end: Callable[[], RunResult]) -> RunResult:
    """``end()``, unless the final checkpoint or final_model/ cannot be written (a full disk, or
    any OS error of the output folder): then the run stops interrupted at its newest complete
    checkpoint, to be continued with --resume auto once there is room. Nothing trained is lost
    beyond the steps since that checkpoint."""
    try:
        return end()
    except (CheckpointError, OSError) as exc:
        error = exc
    path = _complete_saves(run)
    free = free_bytes(run.parts.out_dir)
    reason = (f"the final checkpoint or model could not be written ({error}"
              + (f"; {free / 1e9:.2f} GB free" if free is not None else "") + "); free space, or need less "
              "(--keep-checkpoints, --save-optimizer-state false), and continue with --resume auto")
    _event(run, EVENT_CHECKPOINT_FAILED, {"error": str(error), "free_bytes": free, "checkpoint": path})
    run.log(f"stopped at step {run.state.step}: {reason}")
    _end_row(run, "interrupted", reason)
    return _result(run, "interrupted", reason, path, None)


def _run_identity(run: Run) -> tuple[str | None, bool]:
    """The uid naming this run's row in any database, and whether it takes over the row of a run
    that a process which is gone left ``running`` here before its first checkpoint. A resume
    keeps its checkpoint's uid (None from checkpoints older than uids: their row id names it)."""
    if run.plan.path is not None:
        return run.state.run_uid, False
    left = _read_run_file(run.parts.out_dir)
    if left.get("status") == "running" and isinstance(left.get("uid"), str) and not _alive(left):
        return left["uid"], True
    return uuid.uuid4().hex, False


def _read_run_file(out_dir: Path) -> dict:
    try:
        record = json.loads((out_dir / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _alive(record: dict) -> bool:
    """Whether the process that wrote ``record`` still runs (on this machine; elsewhere it is gone)."""
    pid = record.get("pid")
    if record.get("host") != socket.gethostname() or not isinstance(pid, int):
        return False
    return pid == os.getpid() or pid_alive(pid)


def _write_run_file(run: Run, status: str) -> None:
    """This folder's run: its row (uid and id), its status and the process training it."""
    state, out_dir = run.state, run.parts.out_dir
    if not run.parts.world.is_main or state.run_uid is None:
        return
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out_dir / RUN_FILE, {"uid": state.run_uid, "run_id": state.run_id, "status": status,
                                               "pid": os.getpid(), "host": socket.gethostname()})
    except OSError as exc:      # a hint for the next start: a full disk must not stop the run
        run.log(f"warning: {out_dir / RUN_FILE} not written ({exc})")


def _end_row(run: Run, status: str, reason: str | None) -> None:
    """End the run's row in the recorder, and in this folder's run file."""
    run.recorder.finish(status, reason)
    _write_run_file(run, status)


def _stop_for_signal(run: Run, halt: Halt) -> NoReturn:
    """Emergency checkpoint (unless a step was cut in half), finish the run, raise."""
    path = _complete_saves(run, None if halt.mid_step else run.save("emergency"))
    _event(run, EVENT_SIGNAL, {"signal": halt.cause, "checkpoint": path})
    run.log(f"{halt.cause}: stopped at step {run.state.step}" + (f"; resume from {path}" if path else ""))
    _end_row(run, "interrupted", f"signal {halt.cause}")
    raise TrainingInterrupted(halt.cause, path, EXIT_SIGNALS.get(halt.cause, 130))


def _stop_for_time(run: Run, needed: float) -> RunResult:
    """Emergency checkpoint, finish the run interrupted: ``needed`` seconds (one more step and a
    checkpoint, trainer.loop.Trainer.time_needed) are more than the limit leaves."""
    remaining, total = run.clock.remaining(), run.parts.total_steps
    path = _complete_saves(run, run.save("emergency"))
    reason = (f"time budget: stopped at step {run.state.step} of {total} with {max(remaining, 0):.0f} s "
              f"left, as one more step and a checkpoint need {needed:.0f} s")
    _event(run, EVENT_TIME_BUDGET, {"limit_s": run.clock.limit_s, "remaining_s": remaining, "needed_s": needed,
                                    "checkpoint": path})
    run.log(f"{reason}; continue with --resume auto")
    _end_row(run, "interrupted", reason)
    return _result(run, "interrupted", reason, path, None)


def _stop_early(run: Run, stop: EarlyStop) -> RunResult:
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
    _end_row(run, "completed", stop.reason)
    return _result(run, "completed", stop.reason, checkpoint, model_dir)


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


def _complete_saves(run: Run, path: str | None = None) -> str | None:
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

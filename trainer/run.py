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

Each end is a function of trainer.endings, given the ``Run`` (the parts, the state the steps
ended with, the recorder); the folder's run.json is trainer.run_file. Control runs one way:
run -> setup (the parts, built once) -> loop -> step, faults. The loop returns why it stopped
(a Halt) or raises StopTraining; it never calls back into this module.
"""
from __future__ import annotations

import dataclasses
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from trainer.checkpoints import ResumePlan, plan_resume, report_resume
from trainer.clock import SimulatedTime, StopClock
from trainer.config import TrainConfig
from trainer.data import PreparedData, prepare_data
from trainer.device import place
from trainer.distributed import World, from_main, join, peer_failure, run_gpus
from trainer.endings import (Run, RunResult, complete_saves, end_row, finish, stop_early, stop_for_signal,
                             stop_for_time, stop_on_full_disk)
from trainer.errors import StopTraining
from trainer.gpu_monitor import GpuMonitor, start_gpu_monitor
from trainer.interrupts import StopRequests
from trainer.loop import EARLY_STOP, TIME, Trainer
from trainer.model import count_parameters
from trainer.recorder import NullRecorder, Recorder, RunInfo
from trainer.run_file import RUN_FILE, run_identity
from trainer.setup import setup

__all__ = ["train", "RunResult"]

# NVML's utilisation is the busy fraction of its last 1/6 to 1 s: a sample every 2 s sees a
# 10-second epoch five times, for four NVML calls per GPU on the monitor's own thread.
GPU_SAMPLE_S = 2.0
StartGpuMonitor = Callable[[float, tuple[int, ...]], tuple[GpuMonitor | None, str | None]]


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
        complete_saves(run)
        failure = lost or exc
        end_row(run, "failed", f"{type(failure).__name__}: {failure}")
        if lost is not None and lost is not exc:
            raise lost from exc
        raise
    run = Run.of(loop, plan)
    if halt is not None and halt.cause == TIME:
        return stop_for_time(run, loop.time_needed())
    if halt is not None and halt.cause == EARLY_STOP:
        return stop_on_full_disk(run, lambda: stop_early(run, halt.early_stop))
    if halt is not None:
        stop_for_signal(run, halt)
    return stop_on_full_disk(run, lambda: finish(run, status, reason))


def _start(run: Run, notes: list[str]) -> None:
    """Create the recorder's run, or continue the checkpoint's run when resuming."""
    parts, state, plan, log = run.parts, run.state, run.plan, run.log
    cfg, data = parts.cfg, parts.data
    uid, taken_over = run_identity(parts.out_dir, state.run_uid, plan.path is not None)
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
    run.write_run_file("running")
    if run.store:
        run.store.set_run_id(state.run_id)
        report_resume(plan, run.store, state.step, notes, log)
        run.store.reconcile()
    log(f"run {state.run_id}: {info.n_params:,} parameters on {info.device}, {parts.placement.precision}; "
        f"{parts.total_steps} optimizer steps of {state.batching.per_step} x {cfg.block_size} tokens")

"""The worker loop: claim an interrupted trial or ask for a new one, run it, repeat.

Each worker (a thread of --n-jobs, or another process on the same storage) takes the
study lock only to decide what to run next, so that the study ends with exactly --trials
finished trials and an interrupted trial is continued by exactly one worker.
"""
from __future__ import annotations

import datetime as dt
import os
import socket
import statistics
import time

import optuna

from studies.context import StudyContext, TrialOutcome
from studies.objective import LABELS
from studies.sampling import ask_new_trial
from studies.trial import RUN_ID_ATTR, run_trial
from trainer.clock import SimulatedTime, wall_clock
from trainer.files import pid_alive

WORKER_ATTR = "worker"
RELEASED = "released"   # WORKER_ATTR key of a trial that no process holds: continued from an input
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
RUNNING = (optuna.trial.TrialState.RUNNING,)


def work(ctx: StudyContext, device: str | None = None) -> str:
    """Run trials until the study is done, on ``device`` (a GPU of --devices) when given; return
    why this worker stopped."""
    if device is not None:
        import torch
        torch.cuda.set_device(device)   # this thread's current GPU: its trials' --device cuda resolves to it
    while True:
        if ctx.failures >= ctx.max_failures:
            return "failures"
        if reason := _out_of_time(ctx):
            return reason
        claimed = _next_trial(ctx)
        if claimed is None:
            return "done"
        trial, resumed = claimed
        if ctx.disk is not None and (refusal := ctx.disk.refusal(ctx, trial.number)):
            ctx.log(refusal)
            return "disk budget"   # the trial stays running, released when this process ends
        outcome = run_trial(ctx, trial, resumed)
        ctx.outcomes.append(outcome)
        ctx.log(_describe(outcome, ctx.objective))
        if ctx.disk is not None:
            ctx.disk.after_trial(ctx, outcome)
        if outcome.state == "fail":
            ctx.failures += 1
        if outcome.state == "interrupted":
            return "time budget"


def _next_trial(ctx: StudyContext) -> tuple[optuna.Trial, bool] | None:
    """Under the study lock: an interrupted trial to continue, else a new one, else None."""
    with ctx.lock.held():
        trials = ctx.study.get_trials(deepcopy=False)
        for frozen in trials:
            if frozen.state in RUNNING and _is_stale(ctx, frozen):
                trial = optuna.trial.Trial(ctx.study, frozen._trial_id)
                _mark_worker(trial)
                return trial, True
        if len(trials) >= ctx.n_trials:
            return None  # every trial is finished or held by a live worker
        trial = ask_new_trial(ctx.study, ctx.sampler_name, ctx.seed, ctx.space)
        _mark_worker(trial)
        return trial, False


def release(study: optuna.Study, numbers: list[int], why: str) -> None:
    """Running trials that no process here holds (an earlier session's, merged in): the next
    worker takes them over at once, whatever host or pid they name."""
    trials = {t.number: t for t in study.get_trials(deepcopy=False, states=RUNNING)}
    for number in numbers:
        if number in trials:
            study._storage.set_trial_user_attr(trials[number]._trial_id, WORKER_ATTR, {RELEASED: why})


def _mark_worker(trial: optuna.Trial) -> None:
    trial.set_user_attr(WORKER_ATTR, {"host": socket.gethostname(), "pid": os.getpid(),
                                      "claimed_at": dt.datetime.now(dt.timezone.utc).isoformat()})


def _is_stale(ctx: StudyContext, frozen: optuna.trial.FrozenTrial) -> bool:
    """A running trial nobody works on: its process is gone, or its heartbeat stopped."""
    worker = frozen.user_attrs.get(WORKER_ATTR) or {}
    if worker.get(RELEASED):
        return True
    if worker.get("host") == socket.gethostname() and worker.get("pid"):
        return not pid_alive(int(worker["pid"]))
    return _heartbeat_age(ctx, frozen) > ctx.stale_after_s


def _heartbeat_age(ctx: StudyContext, frozen: optuna.trial.FrozenTrial) -> float:
    """Seconds since the trial's run last wrote to the database (or since the trial started)."""
    run_id = frozen.user_attrs.get(RUN_ID_ATTR)
    if run_id is not None:  # expdb keeps naive UTC times
        return (_utcnow() - ctx.db.run(run_id).updated_at).total_seconds()
    if frozen.datetime_start is not None:  # optuna keeps naive local times
        return (dt.datetime.now() - frozen.datetime_start).total_seconds()
    return float("inf")


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def _out_of_time(ctx: StudyContext) -> str | None:
    """Why no trial may start now, on the study's clock (simulated in tests: trainer.clock)."""
    clock = ctx.time_source or time.monotonic
    if ctx.stop_starting_at is not None and clock() >= ctx.stop_starting_at:
        return "timeout"
    if ctx.deadline is None:
        return None
    left = (ctx.deadline - wall_clock(ctx.time_source).astimezone(dt.timezone.utc)).total_seconds()
    needed = typical_trial_seconds(ctx.study, ctx.time_source)
    if left <= 0 or (needed is not None and needed > left):
        ctx.log(f"time budget: {max(left, 0):.0f} s left, a trial takes about {needed or 0:.0f} s; "
                "no new trial started")
        return "time budget"
    return None


def typical_trial_seconds(study: optuna.Study, time_source: SimulatedTime | None = None) -> float | None:
    """Median duration of the study's completed trials, the estimate for the next one.

    On simulated time a trial lasts its steps times the simulated step (its last reported
    step: a completed trial is evaluated at its end), as real durations are the machine's speed.
    """
    completed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if time_source is not None:
        durations = [max(t.intermediate_values) * time_source.step_s for t in completed if t.intermediate_values]
    else:
        durations = [t.duration.total_seconds() for t in completed if t.duration is not None]
    return statistics.median(durations) if durations else None


def _describe(o: TrialOutcome, objective: str = "val_loss") -> str:
    value = f"{LABELS[objective]} {o.value:.4f}" if o.value is not None else "no value"
    why = f" ({o.reason})" if o.reason else ""
    return f"trial {o.number} {o.state}: {value}, run {o.run_id}{why}"

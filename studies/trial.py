"""One trial = one trainer run, linked both ways with the experiment database.

A trial taken over from a killed worker runs again with the same parameters, in the same
output directory, with ``resume="auto"``: the trainer continues from the trial's last
checkpoint and the database continues the same run row.
"""
from __future__ import annotations

import dataclasses
import math
import socket
import traceback
from typing import Any

import optuna

from studies.context import StudyContext, TrialOutcome
from studies.objective import objective_value
from studies.space import suggest_config
from trainer.errors import StopTraining, TrainerError, TrainingInterrupted
from trainer.faults import DIVERGED
from trainer.recorder import Recorder, RunInfo

RUN_ID_ATTR = "run_id"
FAIL_REASON_ATTR = "fail_reason"
PRUNED_AT_ATTR = "pruned_at_step"


class TrialRecorder:
    """Forwards everything to the database recorder and reports each evaluation's value of the
    study's objective (val_loss or val_bpb) to Optuna: the pruner compares what the study ranks.

    When the pruner says stop, it raises StopTraining: the trainer ends the run as pruned.
    """

    def __init__(self, inner: Recorder, trial: optuna.Trial, existing_run_id: int | None,
                 objective: str = "val_loss"):
        self.inner, self.trial, self.existing_run_id = inner, trial, existing_run_id
        self.objective = objective
        self.last_value = math.nan          # the objective at the last evaluation (a pruned trial's)

    def start_run(self, info: RunInfo) -> int:
        if self.existing_run_id is not None and info.extra.get("run_id") is None:
            # Killed before its first checkpoint: the same run row starts over from step 0.
            info = dataclasses.replace(info, extra={**info.extra, "run_id": self.existing_run_id, "resume_step": 0})
        elif self.existing_run_id is not None:
            # A checkpoint names the run id of the database it was written with (maybe an earlier
            # session's, merged here under another id); the trial's link is this database's.
            info = dataclasses.replace(info, extra={**info.extra, "run_id": self.existing_run_id})
        run_id = self.inner.start_run(info)
        self.trial.set_user_attr(RUN_ID_ATTR, run_id)  # the trial -> run link
        return run_id

    def log_eval(self, step: int, epoch: int, metrics: dict[str, float]) -> None:
        self.inner.log_eval(step, epoch, metrics)
        value = metrics.get(self.objective)
        self.last_value = math.nan if value is None else float(value)
        if not math.isfinite(self.last_value):
            return  # a non-finite loss is no evidence for the pruner; the trainer handles it
        self.trial.report(self.last_value, step)
        if self.trial.should_prune():
            self.trial.set_user_attr(PRUNED_AT_ATTR, step)
            raise StopTraining("pruned", f"{type(self.trial.study.pruner).__name__} at step {step}")

    def finish(self, status: str, reason: str | None = None) -> None:
        # In a study a diverged run is a dead end to prune, not a fault to fix.
        if status == "failed" and (reason or "").startswith(DIVERGED):
            status = "pruned"
        self.inner.finish(status, reason)

    def __getattr__(self, name: str) -> Any:
        # log_step, log_epoch, log_checkpoint and log_event go straight through.
        return getattr(self.inner, name)


def _with_mirrors(ctx: StudyContext, recorder: TrialRecorder, cfg) -> TrialRecorder:
    """--report-to: the pruner's recorder around the mirrors around the database's, so a pruned
    or diverged trial reaches W&B and TensorBoard with the status the database gets."""
    if cfg.report_to in ("", "none"):
        return recorder
    from expdb.mirrors import mirrored
    inner = mirrored(ctx.db, recorder.inner, cfg.report_to, cfg.out_dir, cfg.wandb_project or ctx.study_name,
                     hparam_names=[p.name for p in ctx.space], warn=ctx.log)
    return TrialRecorder(inner, recorder.trial, recorder.existing_run_id, recorder.objective)


def run_trial(ctx: StudyContext, trial: optuna.Trial, resumed: bool) -> TrialOutcome:
    """Train the trial's run and tell Optuna how it ended (unless it is to be continued)."""
    from trainer.run import train  # torch is imported only when a trial really runs

    existing = trial.user_attrs.get(RUN_ID_ATTR) if resumed else None
    values = suggest_config(trial, ctx.space, ctx.base)
    recorder = TrialRecorder(ctx.db.recorder(study_name=ctx.study_name, trial_number=trial.number), trial, existing,
                             ctx.objective)
    ctx.log(f"trial {trial.number}{' (continued)' if resumed else ''}: {_short(values)}")
    try:
        cfg = ctx.trial_config(trial.number, values, earlier_folders(ctx, trial.number, existing))
        recorder = _with_mirrors(ctx, recorder, cfg)
        result = train(cfg, recorder, data=ctx.data_for(cfg), log=lambda *_: None, time_source=ctx.time_source)
    except TrainerError as exc:
        return _fail(ctx, trial, recorder, values, f"{type(exc).__name__}: {exc}")
    except (TrainingInterrupted, KeyboardInterrupt, SystemExit):
        raise  # a request to stop: the trial stays running, the next invocation continues it
    except Exception as exc:  # a trial's crash must not end the study
        ctx.log(traceback.format_exc(limit=3))
        return _fail(ctx, trial, recorder, values, f"{type(exc).__name__}: {exc}")
    run_id = trial.user_attrs.get(RUN_ID_ATTR, result.run_id)
    if result.status == "completed":
        value = objective_value(result, ctx.objective)
        _tell(ctx, trial, value)
        return TrialOutcome(trial.number, "complete", value, run_id)
    if result.status == "pruned" or (result.reason or "").startswith(DIVERGED):
        _tell(ctx, trial, state=optuna.trial.TrialState.PRUNED)
        last = result.last_val_loss if ctx.objective == "val_loss" else recorder.last_value
        return TrialOutcome(trial.number, "pruned", last, run_id, result.reason)
    if result.status == "failed":  # e.g. out of memory at micro-batch 1
        _tell(ctx, trial, state=optuna.trial.TrialState.FAIL)
        trial_reason = (result.reason or "")[:1000]
        trial.set_user_attr(FAIL_REASON_ATTR, trial_reason)
        return TrialOutcome(trial.number, "fail", None, run_id, trial_reason)
    # Stopped for the session's time budget: left RUNNING, the next invocation continues it.
    return TrialOutcome(trial.number, "interrupted", None, run_id, result.reason)


def _tell(ctx: StudyContext, trial: optuna.Trial, value: float | None = None,
          state: optuna.trial.TrialState | None = None) -> None:
    """study.tell, where a GridSampler whose grid is now covered asks the study to stop: a thing
    it can do only inside study.optimize. The trial's state is stored before that; the workers
    stop by the count of trials, so the request is dropped."""
    try:
        ctx.study.tell(trial, value, state=state)
    except RuntimeError as exc:
        if "Study.stop" not in str(exc):
            raise


def earlier_folders(ctx: StudyContext, number: int, run_id: int | None) -> list[str]:
    """Where the trial's run wrote before, when not in its folder here: an earlier session's
    output (a --continue-from input, read in place), found through the run's recorded folder."""
    if run_id is None:
        return []
    try:
        recorded = ctx.db.resolve_path(ctx.db.run(run_id).out_dir)
    except LookupError:
        return []
    if recorded is None or not recorded.is_dir() or recorded.resolve() == ctx.trial_dir(number).resolve():
        return []
    return [str(recorded)]


def _fail(ctx: StudyContext, trial: optuna.Trial, recorder: TrialRecorder, values: dict[str, Any],
          reason: str) -> TrialOutcome:
    trial.set_user_attr(FAIL_REASON_ATTR, reason[:1000])
    if trial.user_attrs.get(RUN_ID_ATTR) is None:
        _record_failed_setup(recorder, trial, values, reason)
    _tell(ctx, trial, state=optuna.trial.TrialState.FAIL)
    return TrialOutcome(trial.number, "fail", None, trial.user_attrs.get(RUN_ID_ATTR), reason)


def _record_failed_setup(recorder: TrialRecorder, trial: optuna.Trial, values: dict[str, Any],
                         reason: str) -> None:
    """A trial that failed before its run started (say, a bad combination of parameters)
    still gets a run row, marked failed with the reason, so the database has every trial."""
    info = RunInfo(name=f"trial-{trial.number}", config=values, dataset={}, tokenizer={}, n_params=0,
                   device="", precision="", host=socket.gethostname())
    recorder.start_run(info)
    recorder.finish("failed", reason[:1000])


def _short(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())

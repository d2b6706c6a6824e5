"""An Optuna objective whose trials are trainer runs, linked both ways with the database."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna

from studies.space import Param, suggest_config
from trainer.config import TrainConfig
from trainer.data import PreparedData
from trainer.errors import StopTraining
from trainer.loop import train
from trainer.recorder import Recorder, RunInfo

RUN_ID_ATTR = "run_id"


class TrialRecorder:
    """Forwards everything to the database recorder and reports validation losses to Optuna.

    When the pruner says stop, it raises StopTraining: the trainer ends the run as pruned.
    """

    def __init__(self, inner: Recorder, trial: optuna.Trial):
        self.inner, self.trial = inner, trial

    def start_run(self, info: RunInfo) -> int:
        run_id = self.inner.start_run(info)
        self.trial.set_user_attr(RUN_ID_ATTR, run_id)  # the trial -> run link
        return run_id

    def log_eval(self, step: int, epoch: int, metrics: dict[str, float]) -> None:
        self.inner.log_eval(step, epoch, metrics)
        self.trial.report(metrics["val_loss"], step)
        if self.trial.should_prune():
            raise StopTraining("pruned", f"{type(self.trial.study.pruner).__name__} at step {step}")

    def __getattr__(self, name: str) -> Any:
        # log_step, log_epoch, log_checkpoint, log_event, finish go straight through.
        return getattr(self.inner, name)


class Objective:
    def __init__(self, base: TrainConfig, space: list[Param], data: PreparedData, db: Any,
                 study_name: str, out_dir: Path, log=print):
        self.base, self.space, self.data, self.db = base, space, data, db
        self.study_name, self.out_dir, self.log = study_name, out_dir, log

    def __call__(self, trial: optuna.Trial) -> float:
        values = suggest_config(trial, self.space, self.base)
        cfg = self.base.replace(**values, out_dir=str(self.out_dir / f"trial-{trial.number:04d}"),
                                run_name=f"{self.study_name}/trial-{trial.number}")
        recorder = TrialRecorder(self.db.recorder(study_name=self.study_name, trial_number=trial.number), trial)
        self.log(f"trial {trial.number}: {_short(values)}")
        result = train(cfg, recorder, data=self.data, log=lambda *_: None)
        if result.status == "pruned":
            raise optuna.TrialPruned(result.reason)
        return result.best_val_loss


def _short(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())

"""What the runner, its workers and each trial share: the study's context and a trial's outcome.

The runner builds one StudyContext, checked once; every worker thread reads it, and each
trial it runs adds a TrialOutcome to it. A module of its own so that the worker loop and
the trial both import it, and neither imports the other for it.
"""
from __future__ import annotations

import datetime as dt
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import optuna

from studies.lock import StudyLock
from studies.space import Param, data_settings
from trainer.clock import SimulatedTime
from trainer.config import TrainConfig

KEPT_DATA = 3     # prepared data of other settings kept in memory (a corpus's tokens each)


@dataclass(frozen=True)
class TrialOutcome:
    number: int
    state: str               # complete, pruned, fail, interrupted (left running, to be continued)
    value: float | None
    run_id: int | None
    reason: str | None = None


@dataclass
class StudyContext:
    """Everything a worker needs, built and checked once by the runner."""

    study: optuna.Study
    storage_url: str
    db: Any                       # expdb.ExperimentDB
    base: TrainConfig
    space: list[Param]
    data: Any                     # trainer.data.PreparedData, shared by all trials
    study_name: str
    out_dir: Path
    n_trials: int
    lock: StudyLock
    seed: int = 0                           # --seed: with the trial number, each new trial's sampler seed
    sampler_name: str = "tpe"
    workdir: Path = Path(".")              # the working folder: the database's; the session pack goes here
    disk: Any = None                        # studies.disk.DiskBudget, or None: no study-wide budget
    max_failures: int = 3
    stale_after_s: float = 300.0
    deadline: dt.datetime | None = None     # --time-budget: the session's end (timezone-aware)
    stop_starting_at: float | None = None   # --timeout, a reading of the study's clock (below)
    time_source: SimulatedTime | None = None   # tests: simulated time (trainer.clock); None: real time
    objective: str = "val_loss"             # studies.objective: what each trial tells Optuna
    log: Callable[..., None] = print
    failures: int = 0
    outcomes: list[TrialOutcome] = field(default_factory=list)
    _data_by_settings: dict[tuple, Any] = field(default_factory=dict, repr=False)
    _data_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def trial_dir(self, number: int) -> Path:
        return self.out_dir / f"trial-{number:04d}"

    def trial_config(self, number: int, values: dict[str, Any], resume_from: list[str] = ()) -> TrainConfig:
        """The trial's run: checkpoints at each evaluation so that it can always be continued.
        ``resume_from``: folders of an earlier session (read in place) holding its checkpoints."""
        extra: dict[str, Any] = {"deadline": self.deadline.isoformat()} if self.deadline else {}
        if resume_from:
            extra["resume_from"] = [*self.base.resume_from, *resume_from]
        return self.base.replace(**values, **extra, out_dir=str(self.trial_dir(number)),
                                 run_name=f"{self.study_name}/trial-{number}", resume="auto", save_on_eval=True)

    def data_for(self, cfg: TrainConfig) -> Any:
        """The prepared data of a trial: the study's, unless the trial searches a setting that
        changes it (a vocab_size, a tokenizer); such data is prepared once per setting, under a
        lock, so that parallel workers train one tokenizer once. A bad one raises DataError."""
        key = data_settings(cfg)
        if key == data_settings(self.base):
            return self.data
        with self._data_lock:
            if key not in self._data_by_settings:
                from trainer.data import prepare_data
                data = prepare_data(cfg, log=self.log)
                if len(self._data_by_settings) >= KEPT_DATA:     # the oldest: its token cache is on disk
                    del self._data_by_settings[next(iter(self._data_by_settings))]
                self._data_by_settings[key] = data
            return self._data_by_settings[key]


def storage_url_for(db: str) -> str:
    """Optuna's storage defaults to the experiment database's own file or server."""
    return db if "://" in db else f"sqlite:///{db}"

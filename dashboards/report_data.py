"""A study's HTML report: Optuna's optimization history, parameter importances, parallel
coordinates and intermediate values (pruning), next to the table of trials and their runs.

``build_report`` makes plain records from the Optuna trials and expdb's study frame: one row
per trial (its run id, Optuna state, run status, value, parameters) and, for each Optuna plot,
either nothing or the note that replaces it (too few trials, nothing reported). The renderer
(``dashboards.report_html``) asks ``optuna.visualization`` for the plots that have no note.
There is no PNG report: Optuna's plots are interactive plotly figures.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import pandas as pd

from dashboards.errors import ReportError
from trainer.files import finite_or_none
from trainer.metrics import perplexity

RUN_ID_ATTR = "run_id"          # the user attribute by which studies link a trial to its run
OBJECTIVE_ATTR = "objective"    # the study's user attribute naming what it minimises (studies.objective)
OBJECTIVES = {"val_loss": "best validation loss", "val_bpb": "validation bits per byte at the best loss"}
PLOTS = ("optimization_history", "param_importances", "parallel_coordinate", "intermediate_values")
PLOT_TITLES = {"optimization_history": "Optimization history",
               "param_importances": "Parameter importances",
               "parallel_coordinate": "Parallel coordinates",
               "intermediate_values": "Intermediate values (pruning)"}
NO_COMPLETED = "no completed trial yet"


class TrialRow(NamedTuple):
    number: int
    run_id: int | None
    state: str                       # Optuna's: complete, pruned, fail, running, waiting
    run_status: str | None           # expdb's status of the run, when there is one
    value: float | None              # the objective: best validation loss, or bits per byte
    best_ppl: float | None           # exp(best validation loss)
    duration_s: float | None
    params: tuple[tuple[str, Any], ...]
    note: str                        # why it ended: the run's status reason or fail reason
    best_val_loss: float | None = None
    best_val_bpb: float | None = None    # None for a run recorded before bits per byte were measured


class Plot(NamedTuple):
    name: str                        # one of PLOTS
    title: str
    note: str | None                 # shown instead of the plot when set


class ReportData(NamedTuple):
    study: str
    direction: str
    trials: tuple[TrialRow, ...]     # by trial number
    param_names: tuple[str, ...]
    plots: tuple[Plot, ...]
    best: int | None                 # the best trial's number
    objective: str = "val_loss"      # what the study minimises: val_loss or val_bpb

    @property
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.trials:
            out[t.state] = out.get(t.state, 0) + 1
        return out


def build_report(study_name: str, direction: str, trials: Sequence[Any],
                 runs: pd.DataFrame | None = None, objective: str = "val_loss") -> ReportData:
    """``trials``: Optuna FrozenTrials; ``runs``: expdb's ``db.study(study_name)`` frame;
    ``objective``: what the trials' values are (val_loss or val_bpb)."""
    by_trial = {} if runs is None or not len(runs) else {
        int(r["trial_number"]): r for _, r in runs.iterrows() if not pd.isna(r["trial_number"])}
    rows = tuple(trial_row(t, by_trial.get(t.number), objective) for t in sorted(trials, key=lambda t: t.number))
    names = tuple(sorted({k for t in trials for k in t.params}))
    done = [t for t in trials if _state(t) == "complete" and t.value is not None]
    best = min(done, key=lambda t: t.value if direction == "minimize" else -t.value) if done else None
    return ReportData(study_name, direction, rows, names, plot_notes(trials), best and best.number, objective)


def trial_row(trial: Any, run: pd.Series | None, objective: str = "val_loss") -> TrialRow:
    """The trial's value is its objective; the other measure, and a pruned trial's value (it has
    none in Optuna), come from its run's best."""
    run_id = trial.user_attrs.get(RUN_ID_ATTR)
    if run_id is None and run is not None:
        run_id = run["run_id"]
    measures = {m: None if run is None else finite_or_none(run.get(f"best_{m}")) for m in ("val_loss", "val_bpb")}
    value = finite_or_none(trial.value)
    if value is None:                            # a pruned trial has no value; its run a best
        value = measures[objective]
    measures[objective] = value
    duration = trial.duration.total_seconds() if trial.duration is not None else None
    note = trial.user_attrs.get("fail_reason") or (run.get("status_reason") if run is not None else None)
    loss = measures["val_loss"]
    return TrialRow(int(trial.number), None if run_id is None else int(run_id), _state(trial),
                    None if run is None else str(run["status"]), value,
                    None if loss is None else perplexity(loss), duration,
                    tuple(sorted(trial.params.items())), "" if _missing(note) else str(note),
                    loss, measures["val_bpb"])


def plot_notes(trials: Sequence[Any]) -> tuple[Plot, ...]:
    """Each Optuna plot, with the note that replaces it when the trials cannot fill it."""
    done = [t for t in trials if _state(t) == "complete"]
    varying = {k for k in {k for t in done for k in t.params}
               if len({repr(t.params.get(k)) for t in done}) > 1}
    notes = {
        "optimization_history": None if done else NO_COMPLETED,
        "param_importances": (f"needs at least 2 completed trials (this study has {len(done)})"
                              if len(done) < 2 else None if varying else
                              "the completed trials all have the same parameters"),
        "parallel_coordinate": None if done else NO_COMPLETED,
        "intermediate_values": None if any(t.intermediate_values for t in trials)
        else "no trial has reported intermediate values yet",
    }
    return tuple(Plot(name, PLOT_TITLES[name], notes[name]) for name in PLOTS)


def load_study(study_name: str, storage: str) -> Any:
    """The Optuna study, read-only: a storage without Optuna's tables is an error, not created."""
    import optuna
    import sqlalchemy.exc

    _check_sqlite_file(storage)
    try:
        rdb = optuna.storages.RDBStorage(storage, skip_table_creation=True)
        names = [s.study_name for s in optuna.get_all_study_summaries(rdb, include_best_trial=False)]
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.OptunaError, ValueError,
            ImportError) as e:
        raise ReportError(f"--storage {storage}: not an Optuna storage ({_root_cause(e)}); pass "
                          "the storage the study was run with (python -m studies.search "
                          "--storage URL)") from e
    if study_name not in names:
        raise ReportError(f"--study {study_name}: no Optuna study of that name in {storage}; "
                          f"it has {', '.join(sorted(names)) or 'none'}")
    return optuna.load_study(study_name=study_name, storage=rdb)


def _check_sqlite_file(storage: str) -> None:
    """SQLite would create a missing file: refuse it instead (a report writes nothing there)."""
    from sqlalchemy import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(storage)
    except ArgumentError as e:
        raise ReportError(f"--storage {storage}: not a database URL ({e}); use e.g. "
                          "sqlite:///experiments.db") from e
    path = url.database
    if url.get_backend_name() == "sqlite" and path not in (None, "", ":memory:") \
            and not Path(path).is_file():
        raise ReportError(f"--storage {storage}: no such SQLite file {path}; pass the storage "
                          "the study was run with")


def fetch_report(db: Any, study_name: str, storage: str) -> tuple[ReportData, Any]:
    """The report's records and the Optuna study (the renderer draws Optuna's plots from it)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = load_study(study_name, storage)
    direction = study.direction.name.lower()
    objective = study.user_attrs.get(OBJECTIVE_ATTR) or "val_loss"     # a study from before the choice
    return build_report(study_name, direction, study.get_trials(deepcopy=False),
                        db.study(study_name), objective), study


def _root_cause(e: BaseException) -> str:
    while e.__cause__ is not None:
        e = e.__cause__
    return str(e).splitlines()[0][:160] if str(e) else type(e).__name__


def _state(trial: Any) -> str:
    return trial.state.name.lower()


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))

"""A study's trials as one table: state, run, validation loss, perplexity and bits per byte,
time, parameters.

Optuna holds one value per trial, the study's objective (studies.objective); the other measure
comes from the trial's run in the experiment database (its best val_loss, and the bits per
byte at that step), blank where there is none (a run recorded before bits per byte were).
"""
from __future__ import annotations

import math
from typing import Any

import optuna
import pandas as pd

from studies.trial import FAIL_REASON_ATTR, RUN_ID_ATTR
from trainer.metrics import perplexity

MEASURES = {"val_loss": "best_val_loss", "val_bpb": "best_val_bpb"}   # objective -> the run's column


def results_table(study: optuna.Study, objective: str = "val_loss", runs: pd.DataFrame | None = None
                  ) -> pd.DataFrame:
    """``runs``: the study's rows of expdb's db.runs(), for the measure Optuna does not hold."""
    by_id = {} if runs is None else {int(r["id"]): r for _, r in runs.iterrows()}
    rows = []
    for t in study.get_trials(deepcopy=False):
        run_id = t.user_attrs.get(RUN_ID_ATTR)
        measures = {m: _run_value(by_id.get(run_id), column) for m, column in MEASURES.items()}
        measures[objective] = trial_value(t)
        rows.append({"trial": t.number, "state": t.state.name.lower(), "run_id": run_id,
                     "val_loss": measures["val_loss"], "val_ppl": perplexity(measures["val_loss"]),
                     "val_bpb": measures["val_bpb"],
                     "seconds": t.duration.total_seconds() if t.duration else math.nan, **t.params,
                     "note": t.user_attrs.get(FAIL_REASON_ATTR, "")[:60]})
    return pd.DataFrame(rows)


def trial_value(t: optuna.trial.FrozenTrial) -> float:
    """The trial's objective: its value, else (pruned, running) its last reported one."""
    if t.value is not None:
        return t.value
    return t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else math.nan


def _run_value(run: Any, column: str) -> float:
    value = None if run is None else run.get(column)
    return math.nan if value is None or pd.isna(value) else float(value)

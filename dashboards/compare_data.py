"""Plain records for comparing runs: a study's trials, or any runs across studies.

Four views of the same runs: the validation curves of the best ``top`` runs (the others thin
and grey behind them), the best perplexity of every run, and every hyperparameter that differs
between the runs against the objective (best validation loss). A run's state (completed,
pruned, failed, running, interrupted) travels with each of its marks, so the renderers can show
pruned trials as such. ``build_comparison`` is pure (frames in, NamedTuples out);
``fetch_comparison`` reads the frames from expdb.
"""
from __future__ import annotations

import json
import math
from typing import Any, NamedTuple, Sequence

import pandas as pd

from dashboards.run_data import validation_points
from dashboards.series import MAX_POINTS, reduce_minmax
from trainer.files import finite_or_none
from trainer.metrics import perplexity

OBJECTIVE = "best validation loss (nats)"
MAX_BACKGROUND = 50            # grey curves behind the top k; more would be a smear
# config keys that say where or how a run was executed, not what it learned
BOOKKEEPING = frozenset({"out_dir", "run_name", "cache_dir", "progress", "device", "resume",
                         "resume_from", "deadline", "time_budget", "save_every", "log_every"})
NO_VALIDATION = "no validation yet"
NO_PARAMS = "no hyperparameter differs between these runs"


class Curve(NamedTuple):
    run_id: int
    label: str                   # "trial 3 (pruned)" or "run 7 name"
    state: str
    x: tuple[float, ...]         # step
    y: tuple[float, ...]         # validation loss
    best: float | None           # the run's best validation loss


class TrialBest(NamedTuple):
    run_id: int
    label: str                   # short: "t3" in a study, "run 7" across studies
    state: str
    best_ppl: float | None       # exp(best validation loss); None without validation


class ParamPoints(NamedTuple):
    name: str
    values: tuple[Any, ...]      # floats, or strings when categorical
    objective: tuple[float, ...]
    states: tuple[str, ...]
    run_ids: tuple[int, ...]
    categorical: bool = False
    log_x: bool = False


class ComparisonData(NamedTuple):
    title: str
    curves: tuple[Curve, ...]           # the top runs with validation, best first
    background: tuple[Curve, ...]       # the other runs' curves, drawn thin and grey
    trials: tuple[TrialBest, ...]       # every run, in trial (or id) order
    params: tuple[ParamPoints, ...]     # each differing hyperparameter against the objective
    notes: tuple[str, ...]


def shown_notes(data: ComparisonData) -> tuple[str, ...]:
    """The notes under the picture: the data's own, and a word when no parameter differs."""
    return data.notes + (() if data.params or not data.trials else (NO_PARAMS,))


def fetch_comparison(db: Any, run_ids: Sequence[int] | None = None, study: str | None = None,
                     top: int = 10, max_points: int = MAX_POINTS) -> ComparisonData:
    """Compare ``run_ids`` (any runs) or every run of ``study``, reading expdb."""
    runs = db.runs(study) if study is not None else db.runs()
    if run_ids is not None:
        missing = sorted(set(run_ids) - set(runs["id"]))
        if missing:
            raise LookupError(f"run_ids: no run with id {', '.join(map(str, missing))}"
                              + (f" in study {study}" if study is not None else ""))
        runs = runs.set_index("id").loc[list(dict.fromkeys(run_ids))].reset_index()
    ranked = rank(runs)
    history = {int(i): (db.evals(int(i)), db.epochs(int(i)))
               for i in ranked["id"].head(top + MAX_BACKGROUND)}
    title = (f"Study {study}" if study is not None
             else "Runs " + ", ".join(str(i) for i in runs["id"]))
    return build_comparison(runs, history, title, top, max_points)


def rank(runs: pd.DataFrame) -> pd.DataFrame:
    """Best validation loss first; runs without one last, by id."""
    return runs.sort_values(["best_val_loss", "id"], na_position="last", kind="stable")


def build_comparison(runs: pd.DataFrame, history: dict[int, tuple[pd.DataFrame, pd.DataFrame]],
                     title: str, top: int = 10, max_points: int = MAX_POINTS) -> ComparisonData:
    """``runs``: rows of db.runs(); ``history``: run id -> (evals, epochs) of the runs to draw."""
    one_study = runs["study_name"].nunique(dropna=False) == 1 and runs["study_name"].notna().all()
    rows = [r for _, r in rank(runs).iterrows()]
    curves = [build_curve(r, *history[int(r["id"])], one_study, max_points)
              for r in rows if int(r["id"]) in history]
    drawn = [c for c in curves if c.x]
    notes = [f"{c.label}: {NO_VALIDATION}" for c in curves[:top] if not c.x]
    if len(rows) > len(history):
        notes.append(f"{len(rows) - len(history)} more runs not drawn as curves")
    counts = runs["status"].value_counts()
    summary = ", ".join(f"{n} {s}" for s, n in counts.items())
    return ComparisonData(
        title=f"{title}: {len(runs)} run{'s' * (len(runs) != 1)} ({summary})" if len(runs) else title,
        curves=tuple(drawn[:top]), background=tuple(drawn[top:]),
        trials=trial_bests(runs, one_study), params=param_points(runs), notes=tuple(notes))


def run_label(row: pd.Series, one_study: bool, short: bool = False) -> str:
    trial = row.get("trial_number")
    has_trial = trial is not None and not (isinstance(trial, float) and math.isnan(trial))
    if one_study and has_trial:
        return f"t{int(trial)}" if short else f"trial {int(trial)} (run {int(row['id'])})"
    if short:
        return f"run {int(row['id'])}"
    where = f", {row['study_name']} t{int(trial)}" if has_trial else ""
    return f"run {int(row['id'])} {row['name']}{where}"


def build_curve(row: pd.Series, evals: pd.DataFrame | None, epochs: pd.DataFrame | None,
                one_study: bool = False, max_points: int = MAX_POINTS) -> Curve:
    x, y, _ = validation_points(evals, epochs)
    x, y = reduce_minmax(x, y, max_points)
    best = finite_or_none(row.get("best_val_loss"))
    if best is None and y.size:
        best = float(y.min())
    state = str(row["status"])
    label = run_label(row, one_study) + ("" if state == "completed" else f" ({state})")
    return Curve(int(row["id"]), label, state, tuple(x.tolist()), tuple(y.tolist()), best)


def trial_bests(runs: pd.DataFrame, one_study: bool) -> tuple[TrialBest, ...]:
    order = runs.sort_values(["trial_number", "id"] if one_study else ["id"], kind="stable")
    out = []
    for _, r in order.iterrows():
        best = finite_or_none(r.get("best_val_loss"))
        out.append(TrialBest(int(r["id"]), run_label(r, one_study, short=True), str(r["status"]),
                             None if best is None else perplexity(best)))
    return tuple(out)


def param_points(runs: pd.DataFrame) -> tuple[ParamPoints, ...]:
    """One ParamPoints per config value that differs between the runs with an objective."""
    scored = runs[runs["best_val_loss"].notna()]
    configs = flat_configs(scored)
    return tuple(_param(name, [c.get(name) for c in configs], scored)
                 for name in differing(configs))


def flat_configs(runs: pd.DataFrame) -> list[dict[str, Any]]:
    """Each run's config with lists and dicts as JSON text (comparable, printable)."""
    return [{k: _scalar(v) for k, v in (c or {}).items()} for c in runs["config"]]


def differing(configs: list[dict[str, Any]]) -> list[str]:
    """The config names, bookkeeping aside, whose value is not the same in every config."""
    names = sorted({k for c in configs for k in c} - BOOKKEEPING)
    return [n for n in names if len({json.dumps(c.get(n), default=str) for c in configs}) > 1]


def _param(name: str, values: list[Any], scored: pd.DataFrame) -> ParamPoints:
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if numeric:
        vals = tuple(float(v) for v in values)
        positive = min(vals) > 0
        log_x = positive and max(vals) / min(vals) >= 20
    else:
        vals, log_x = tuple("none" if v is None else str(v) for v in values), False
    return ParamPoints(name, vals, tuple(float(v) for v in scored["best_val_loss"]),
                       tuple(str(s) for s in scored["status"]),
                       tuple(int(i) for i in scored["id"]), categorical=not numeric, log_x=log_x)


def _scalar(value: Any) -> Any:
    return json.dumps(value, default=str) if isinstance(value, (list, dict)) else value


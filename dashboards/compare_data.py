"""Plain records for comparing runs: a study's trials, or any runs across studies.

Four views of the same runs: the validation curves of the best ``top`` runs (the others thin
and grey behind them), the best perplexity of every run, and every hyperparameter that differs
between the runs against the objective (best validation loss). A run's state (completed,
pruned, failed, running, interrupted) travels with each of its marks, so the renderers can show
pruned trials as such. ``build_comparison`` is pure (frames in, NamedTuples out);
``fetch_comparison`` reads the frames from expdb.

The metric is validation loss, or bits per byte (``val_bpb``) when the runs' tokenizers differ:
a loss per token of one vocabulary does not compare with another's, bits per byte of the same
text do. Then the curves, the bests (bits per byte instead of perplexity) and the parameter
panels all show bits per byte. Runs recorded before bits per byte were measured have none.
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
METRICS = ("val_loss", "val_bpb")


class Metric(NamedTuple):
    """What a comparison ranks and draws, and how its panels name it."""
    best_column: str             # db.runs()'s column of each run's best
    curve_column: str            # the evals' (epochs') column drawn as curves
    name: str                    # the curves panel's title starts with it
    curve_label: str             # the curves' y axis
    objective: str               # the parameter panels' y axis
    bests_title: str
    bests_label: str             # the bests panel's y axis
    hover: str                   # a curve point's value, in hover text


METRIC_INFO = {
    "val_loss": Metric("best_val_loss", "val_loss", "Validation loss", "validation loss (nats)", OBJECTIVE,
                       "Best perplexity per run", "best validation perplexity", "val loss"),
    "val_bpb": Metric("best_val_bpb", "val_bpb", "Validation bits per byte", "validation bits per byte",
                      "best validation bits per byte", "Best bits per byte per run", "best validation bits per byte",
                      "bits per byte"),
}
TOKENIZERS_DIFFER = "the runs' tokenizers differ"
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
    best: float | None           # the run's best of the metric (validation loss, or bits per byte)


class TrialBest(NamedTuple):
    run_id: int
    label: str                   # short: "t3" in a study, "run 7" across studies
    state: str
    best: float | None           # exp(best validation loss), or the best bits per byte; None without


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
    metric: str = "val_loss"            # one of METRICS: what is ranked and drawn

    @property
    def info(self) -> Metric:
        return METRIC_INFO[self.metric]


def shown_notes(data: ComparisonData) -> tuple[str, ...]:
    """The notes under the picture: the data's own, and a word when no parameter differs."""
    return data.notes + (() if data.params or not data.trials else (NO_PARAMS,))


def fetch_comparison(db: Any, run_ids: Sequence[int] | None = None, study: str | None = None,
                     top: int = 10, max_points: int = MAX_POINTS, metric: str | None = None) -> ComparisonData:
    """Compare ``run_ids`` (any runs) or every run of ``study``, reading expdb, by ``metric``
    (None: bits per byte where the runs' tokenizers differ, see ``choose_metric``)."""
    runs = db.runs(study) if study is not None else db.runs()
    if run_ids is not None:
        missing = sorted(set(run_ids) - set(runs["id"]))
        if missing:
            raise LookupError(f"run_ids: no run with id {', '.join(map(str, missing))}"
                              + (f" in study {study}" if study is not None else ""))
        runs = runs.set_index("id").loc[list(dict.fromkeys(run_ids))].reset_index()
    metric, notes = choose_metric(runs, metric)
    ranked = rank(runs, metric)
    history = {int(i): (db.evals(int(i)), db.epochs(int(i)))
               for i in ranked["id"].head(top + MAX_BACKGROUND)}
    title = (f"Study {study}" if study is not None
             else "Runs " + ", ".join(str(i) for i in runs["id"]))
    data = build_comparison(runs, history, title, top, max_points, metric)
    return data._replace(notes=notes + data.notes)


def choose_metric(runs: pd.DataFrame, requested: str | None = None) -> tuple[str, tuple[str, ...]]:
    """``requested``, else bits per byte where the runs' tokenizers differ and some run has them;
    with a note where validation losses of different tokenizers are compared all the same."""
    differ = tokenizers_differ(runs)
    has_bpb = "best_val_bpb" in runs and runs["best_val_bpb"].notna().any()
    metric = requested or ("val_bpb" if differ and has_bpb else "val_loss")
    if metric == "val_loss" and differ:
        why = "" if requested else ", and none of them recorded bits per byte (runs from before they were)"
        return metric, (f"{TOKENIZERS_DIFFER}{why}: their losses per token do not compare; "
                        "bits per byte would (--metric val_bpb)",)
    return metric, ()


def tokenizers_differ(runs: pd.DataFrame) -> bool:
    """Whether the runs used more than one tokenizer: by the recorded tokenizer's hash where
    there is one, else by the settings (tokenizer, and vocab_size for a trained BPE)."""
    return len({tokenizer_key(r) for _, r in runs.iterrows()}) > 1


def tokenizer_key(run: pd.Series) -> Any:
    identity = run.get("tokenizer")
    if isinstance(identity, dict) and identity.get("sha256"):
        return identity["sha256"]
    config = run.get("config")
    config = config if isinstance(config, dict) else {}
    name = config.get("tokenizer")
    return (name, config.get("vocab_size") if name == "bpe" else None)


def rank(runs: pd.DataFrame, metric: str = "val_loss") -> pd.DataFrame:
    """Best of ``metric`` first; runs without one last, by id."""
    column = METRIC_INFO[metric].best_column
    runs = runs if column in runs else runs.assign(**{column: math.nan})
    return runs.sort_values([column, "id"], na_position="last", kind="stable")


def build_comparison(runs: pd.DataFrame, history: dict[int, tuple[pd.DataFrame, pd.DataFrame]],
                     title: str, top: int = 10, max_points: int = MAX_POINTS,
                     metric: str = "val_loss") -> ComparisonData:
    """``runs``: rows of db.runs(); ``history``: run id -> (evals, epochs) of the runs to draw."""
    info = METRIC_INFO[metric]
    runs = runs if info.best_column in runs else runs.assign(**{info.best_column: math.nan})
    one_study = runs["study_name"].nunique(dropna=False) == 1 and runs["study_name"].notna().all()
    rows = [r for _, r in rank(runs, metric).iterrows()]
    curves = [build_curve(r, *history[int(r["id"])], one_study, max_points, metric)
              for r in rows if int(r["id"]) in history]
    drawn = [c for c in curves if c.x]
    missing = NO_VALIDATION if metric == "val_loss" else "no bits per byte recorded"
    notes = [f"{c.label}: {missing}" for c in curves[:top] if not c.x]
    if len(rows) > len(history):
        notes.append(f"{len(rows) - len(history)} more runs not drawn as curves")
    counts = runs["status"].value_counts()
    summary = ", ".join(f"{n} {s}" for s, n in counts.items())
    return ComparisonData(
        title=f"{title}: {len(runs)} run{'s' * (len(runs) != 1)} ({summary})" if len(runs) else title,
        curves=tuple(drawn[:top]), background=tuple(drawn[top:]),
        trials=trial_bests(runs, one_study, metric), params=param_points(runs, metric), notes=tuple(notes),
        metric=metric)


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
                one_study: bool = False, max_points: int = MAX_POINTS, metric: str = "val_loss") -> Curve:
    info = METRIC_INFO[metric]
    x, y, _ = validation_points(evals, epochs, info.curve_column)
    x, y = reduce_minmax(x, y, max_points)
    best = finite_or_none(row.get(info.best_column))
    if best is None and y.size:
        best = float(y.min())
    state = str(row["status"])
    label = run_label(row, one_study) + ("" if state == "completed" else f" ({state})")
    return Curve(int(row["id"]), label, state, tuple(x.tolist()), tuple(y.tolist()), best)


def trial_bests(runs: pd.DataFrame, one_study: bool, metric: str = "val_loss") -> tuple[TrialBest, ...]:
    order = runs.sort_values(["trial_number", "id"] if one_study else ["id"], kind="stable")
    out = []
    for _, r in order.iterrows():
        best = finite_or_none(r.get(METRIC_INFO[metric].best_column))
        shown = perplexity(best) if best is not None and metric == "val_loss" else best
        out.append(TrialBest(int(r["id"]), run_label(r, one_study, short=True), str(r["status"]), shown))
    return tuple(out)


def param_points(runs: pd.DataFrame, metric: str = "val_loss") -> tuple[ParamPoints, ...]:
    """One ParamPoints per config value that differs between the runs with an objective."""
    column = METRIC_INFO[metric].best_column
    scored = runs[runs[column].notna()]
    configs = flat_configs(scored)
    return tuple(_param(name, [c.get(name) for c in configs], scored[column], scored)
                 for name in differing(configs))


def flat_configs(runs: pd.DataFrame) -> list[dict[str, Any]]:
    """Each run's config with lists and dicts as JSON text (comparable, printable)."""
    return [{k: _scalar(v) for k, v in (c or {}).items()} for c in runs["config"]]


def differing(configs: list[dict[str, Any]]) -> list[str]:
    """The config names, bookkeeping aside, whose value is not the same in every config."""
    names = sorted({k for c in configs for k in c} - BOOKKEEPING)
    return [n for n in names if len({json.dumps(c.get(n), default=str) for c in configs}) > 1]


def _param(name: str, values: list[Any], objective: pd.Series, scored: pd.DataFrame) -> ParamPoints:
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if numeric:
        vals = tuple(float(v) for v in values)
        positive = min(vals) > 0
        log_x = positive and max(vals) / min(vals) >= 20
    else:
        vals, log_x = tuple("none" if v is None else str(v) for v in values), False
    return ParamPoints(name, vals, tuple(float(v) for v in objective),
                       tuple(str(s) for s in scored["status"]),
                       tuple(int(i) for i in scored["id"]), categorical=not numeric, log_x=log_x)


def _scalar(value: Any) -> Any:
    return json.dumps(value, default=str) if isinstance(value, (list, dict)) else value


"""Metric tables as CSV or JSON: a run's epochs and evaluations, or a summary row per run.

``run_table`` puts a run's epoch rows and evaluation rows into one long table (column
``kind`` = ``epoch`` or ``eval``), ordered by step; ``summary_table`` has one row per run of a
study (or any runs): status, best validation loss, perplexity and bits per byte (blank for a
run recorded before bits per byte were measured), sizes, durations and the
hyperparameters that differ between the runs (``param_<name>``). Both are plain records
(``Table``); ``to_csv`` and ``to_json`` render them. JSON holds the same rows as objects,
with null for a missing or NaN value, under a header describing the run or study.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd

from dashboards.compare_data import differing, flat_configs
from trainer.files import atomic_write_bytes
from trainer.metrics import perplexity

RUN_COLUMNS = ("kind", "epoch", "step", "train_loss", "val_loss", "val_ppl", "val_bpb", "val_word_ppl", "lr",
               "grad_norm", "epoch_seconds", "tokens_per_s", "mfu", "mem_process_mb", "mem_gpu_allocated_mb",
               "mem_gpu_reserved_mb", "mem_gpu_peak_mb", "gpu_util_pct", "gpu_util_max_pct",
               "gpu_mem_used_mb", "gpu_temp_c", "gpu_power_w")
SUMMARY_COLUMNS = ("run_id", "study_name", "trial_number", "name", "status", "status_reason",
                   "best_val_loss", "best_ppl", "best_val_bpb", "best_step", "n_steps", "n_epochs", "resume_count",
                   "duration_s", "started_at", "ended_at")
INT_COLUMNS = ("epoch", "step", "run_id", "trial_number", "best_step", "n_steps", "n_epochs",
               "resume_count")
FORMATS = (".csv", ".json")


class Table(NamedTuple):
    header: tuple[tuple[str, Any], ...]      # what the table is (JSON only)
    rows_key: str                            # the JSON key of the rows: "metrics" or "runs"
    columns: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]        # None for missing or NaN


def run_table(run: Any, evals: pd.DataFrame, epochs: pd.DataFrame) -> Table:
    frames = [f.assign(kind=kind) for kind, f in (("eval", evals), ("epoch", epochs)) if len(f)]
    both = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=RUN_COLUMNS)
    order = both["kind"].map({"eval": 0, "epoch": 1})        # an epoch ends after its last eval
    both = both.assign(_o=order).sort_values(["step", "_o"], kind="stable", na_position="last")
    header = (("run_id", int(run.id)), ("name", run.name), ("status", run.status),
              ("study_name", run.study_name), ("trial_number", run.trial_number),
              ("best_val_loss", run.best_val_loss), ("best_val_bpb", getattr(run, "best_val_bpb", None)),
              ("best_step", run.best_step))
    return Table(tuple((k, _plain(v)) for k, v in header), "metrics", RUN_COLUMNS,
                 _rows(both, RUN_COLUMNS))


def summary_table(runs: pd.DataFrame, header: tuple[tuple[str, Any], ...]) -> Table:
    """``runs``: rows of db.runs() (a study's, or any)."""
    runs = runs.rename(columns={"id": "run_id"}).sort_values(
        ["study_name", "trial_number", "run_id"], kind="stable", na_position="last")
    runs = runs.assign(best_ppl=[_perplexity(v) for v in runs["best_val_loss"]])
    configs = flat_configs(runs)
    names = differing(configs)
    params = pd.DataFrame([{f"param_{n}": c.get(n) for n in names} for c in configs],
                          index=runs.index, columns=[f"param_{n}" for n in names])
    columns = SUMMARY_COLUMNS + tuple(params.columns)
    return Table(header, "runs", columns, _rows(pd.concat([runs, params], axis=1), columns))


def to_csv(table: Table) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(table.columns)
    writer.writerows(["" if v is None else v for v in row] for row in table.rows)
    return buf.getvalue().encode("utf-8")


def to_json(table: Table) -> bytes:
    doc = dict(table.header)
    doc["columns"] = list(table.columns)
    doc[table.rows_key] = [dict(zip(table.columns, row)) for row in table.rows]
    return (json.dumps(doc, indent=1, allow_nan=False) + "\n").encode("utf-8")


def fetch_table(db: Any, run_id: int | None = None, study: str | None = None,
                run_ids: list[int] | None = None) -> Table:
    if run_id is not None:
        return run_table(db.run(run_id), db.evals(run_id), db.epochs(run_id))
    runs = db.runs(study)
    if run_ids is not None:
        runs = runs[runs["id"].isin(run_ids)]
    header = (("study", study),) if study is not None else (("run_ids", list(run_ids or [])),)
    return summary_table(runs, header)


def write_metrics_table(db: Any, out: str | os.PathLike, run_id: int | None = None,
                        study: str | None = None, run_ids: list[int] | None = None) -> Path:
    out = Path(out)
    if out.suffix.lower() not in FORMATS:
        raise ValueError(f"{out}: a table is a .csv or .json file")
    table = fetch_table(db, run_id, study, run_ids)
    out.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(out, to_csv(table) if out.suffix.lower() == ".csv" else to_json(table))


def _rows(df: pd.DataFrame, columns: tuple[str, ...]) -> tuple[tuple[Any, ...], ...]:
    df = df.assign(**{c: pd.to_numeric(df[c], errors="coerce").astype("Int64")   # 157, not 157.0
                      for c in INT_COLUMNS if c in df.columns})
    present = [c if c in df.columns else None for c in columns]
    return tuple(tuple(_plain(row[c]) if c else None for c in present)
                 for _, row in df.iterrows())


def _plain(value: Any) -> Any:
    """A JSON/CSV-ready Python value: None for NaN/NaT/missing, ISO text for times."""
    if value is None or (not isinstance(value, (str, list, dict)) and pd.isna(value)):
        return None
    if isinstance(value, pd.Timestamp) or hasattr(value, "isoformat"):
        return value.isoformat()
    if hasattr(value, "item"):                  # numpy scalar
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    return value


def _perplexity(loss: Any) -> float | None:
    v = _plain(loss)
    return None if v is None else perplexity(float(v))

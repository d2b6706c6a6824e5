"""A run's title (name, study, trial, key hyperparameters) and its event markers (resume,
out-of-memory, non-finite, best checkpoint), as records for the run dashboard."""
from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pandas as pd

from dashboards.run_records import Marker, Title
from dashboards.series import column

MARKER_KINDS = ("resume", "oom", "nonfinite", "early_stop")   # events drawn as vertical lines on step panels
# An oom event whose remedy was activation checkpointing is drawn as its own kind of marker.
CHECKPOINTING_MARKER = "gradient_checkpointing"


def run_config(run: Any) -> dict[str, Any]:
    config = getattr(run, "config", None) or {}
    return json.loads(config) if isinstance(config, str) else dict(config)


def build_title(run: Any, config: dict[str, Any], validation: pd.DataFrame | None = None) -> Title:
    """``validation``: the run's eval rows (or epoch rows), for the word perplexity at its best step."""
    trial = getattr(run, "trial_number", None)
    return Title(run_id=int(run.id), name=str(getattr(run, "name", "") or f"run {run.id}"),
                 status=str(getattr(run, "status", "") or "unknown"),
                 study=getattr(run, "study_name", None) or None,
                 trial=None if _missing(trial) else int(trial),
                 hparams=hyperparameters(run, config), results=best_results(run, validation))


def best_results(run: Any, validation: pd.DataFrame | None) -> tuple[tuple[str, str], ...]:
    """The run's best val loss, the bits per byte at that step and its word perplexity where each
    was recorded (a run from before bits per byte has the loss alone)."""
    step = getattr(run, "best_step", None)
    word_ppl = at_step(validation, "val_word_ppl", step)
    items = [("best val loss", _fmt4(getattr(run, "best_val_loss", None))),
             ("bits per byte", _fmt4(getattr(run, "best_val_bpb", None))), ("word ppl", _fmt4(word_ppl))]
    return tuple((k, v) for k, v in items if v is not None)


def at_step(rows: pd.DataFrame | None, name: str, step: Any) -> float | None:
    """``name`` of the last row at ``step`` with a finite value, or None."""
    if rows is None or _missing(step) or not len(rows):
        return None
    values = column(rows, name)[column(rows, "step") == float(step)]
    values = values[np.isfinite(values)]
    return float(values[-1]) if values.size else None


def _fmt4(value: Any) -> str | None:
    if _missing(value) or not math.isfinite(float(value)):
        return None
    return f"{float(value):.4g}"


def hyperparameters(run: Any, config: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """The settings that identify a run at a glance, as (name, text); absent ones are left out."""
    items = [(k, _fmt(config.get(k))) for k in ("n_layer", "n_embd", "n_head", "block_size", "lr")]
    items.append(("tokenizer", tokenizer_text(config)))
    if config.get("micro_batch") is not None:
        items.append(("batch", f"{config['micro_batch']}x{config.get('grad_accum', 1)}"))
    items.append(("precision", _fmt(getattr(run, "precision", None) or config.get("precision"))))
    n_params = getattr(run, "n_params", None)
    items.append(("params", None if _missing(n_params) else human_count(n_params)))
    return tuple((k, v) for k, v in items if v is not None)


def tokenizer_text(config: dict[str, Any]) -> str | None:
    """"bpe 2048" for a trained BPE (its size is a setting), else the pretrained one's name."""
    name = config.get("tokenizer")
    if name is None:
        return None
    return f"bpe {config['vocab_size']}" if name == "bpe" and config.get("vocab_size") else str(name)


def human_count(n: float) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{suffix}"
    return str(int(round(n)))


def _fmt(value: Any) -> str | None:
    if _missing(value):
        return None
    return f"{value:g}" if isinstance(value, float) else str(value)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


# -- markers ---------------------------------------------------------------------------------
def build_markers(run: Any, checkpoints: pd.DataFrame | None, events: pd.DataFrame | None
                  ) -> tuple[Marker, ...]:
    """Resume / OOM / non-finite events and the best checkpoint's step, sorted by step."""
    markers = []
    if events is not None and len(events):
        steps = column(events, "step")
        details = events["detail"] if "detail" in events else [None] * len(events)
        markers += [Marker(marker_kind(str(k), d), float(s)) for k, s, d in zip(events["kind"], steps, details)
                    if k in MARKER_KINDS and np.isfinite(s)]
    best = best_step(run, checkpoints)
    if best is not None:
        markers.append(Marker("best", best))
    return tuple(sorted(markers, key=lambda m: (m.step, m.kind)))


def marker_kind(kind: str, detail: Any) -> str:
    """The event's kind, except an oom remedied by gradient checkpointing (not a smaller batch)."""
    if kind == "oom" and isinstance(detail, dict) and detail.get("remedy") == CHECKPOINTING_MARKER:
        return CHECKPOINTING_MARKER
    return kind


def best_step(run: Any, checkpoints: pd.DataFrame | None) -> float | None:
    """run.best_step, else the lowest-val_loss checkpoint (kind "best" preferred)."""
    step = getattr(run, "best_step", None)
    if not _missing(step):
        return float(step)
    if checkpoints is None or not len(checkpoints):
        return None
    rows = checkpoints.assign(_v=column(checkpoints, "val_loss"), _s=column(checkpoints, "step"))
    rows = rows[np.isfinite(rows["_v"]) & np.isfinite(rows["_s"])]
    best_kind = rows[rows["kind"] == "best"] if "kind" in rows else rows.iloc[:0]
    rows = best_kind if len(best_kind) else rows
    return float(rows.sort_values(["_v", "_s"]).iloc[0]["_s"]) if len(rows) else None



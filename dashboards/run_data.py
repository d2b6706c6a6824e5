"""Plain records for the six-panel run dashboard, built from expdb reads.

``build_run_data`` is pure (a run record and DataFrames in, NamedTuples of tuples out), so it
is tested by equality without a database; ``fetch_run_data`` reads those frames from expdb.
Renderers (``dashboards.run_png``, ``dashboards.run_html``) draw the records and decide
nothing about the data: every note, fallback and reduction is decided here. The records
themselves live in ``dashboards.run_records`` (``run_meta`` builds the title and markers).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from dashboards.run_records import Marker, Panel, RunDashboardData, SecondAxis, Series, Title
from dashboards.run_meta import build_markers, build_title, human_count, run_config
from dashboards.series import (MAX_POINTS, column, finite_xy, moving_average, reduce_minmax,
                               smoothing_window)

__all__ = ["Marker", "Panel", "RunDashboardData", "SecondAxis", "Series", "Title", "build_run_data",
           "fetch_run_data"]

GPU_MEMORY = (("mem_gpu_allocated_mb", "allocated"), ("mem_gpu_reserved_mb", "reserved"),
              ("mem_gpu_peak_mb", "peak"))
STEP_COLUMNS = ("loss", "lr", "grad_norm")    # the step metrics the dashboard draws
STEP_ROWS_PER_POINT = 2
NO_STEPS = "no step metrics recorded"
NO_VALIDATION = "no validation yet"
NO_EPOCHS = "no epoch completed yet"
MISSING = "missing or non-finite"
GPU_UTIL_CPU = "GPU utilisation: not sampled (CPU run)"
GPU_UTIL_MISSING = "GPU utilisation: not recorded (no nvidia-ml-py, or an older run)"


def fetch_run_data(db: Any, run_id: int, max_points: int = MAX_POINTS) -> RunDashboardData:
    """Read one run from an open expdb database and build its dashboard records."""
    run = db.run(run_id)                    # first: a run that says it finished has all its rows
    reduced = hasattr(db, "step_series")
    return build_run_data(run, read_steps(db, run_id, max_points), db.evals(run_id),
                          db.epochs(run_id), db.checkpoints(run_id), db.events(run_id),
                          max_points=max_points, steps_reduced=reduced)


def read_steps(db: Any, run_id: int, max_points: int = MAX_POINTS) -> pd.DataFrame:
    """The run's step rows for drawing: reduced by the database when expdb can.

    ``db.step_series`` keeps, per bucket of steps, the rows holding each column's minimum and
    maximum (from per-64-step summaries, so a 1M-step run is not read row by row); its buckets
    are shared by the columns, so it gets STEP_ROWS_PER_POINT rows per drawn point and
    ``reduce_minmax`` then thins each column to ``max_points``. An expdb without it: every row.
    """
    series = getattr(db, "step_series", None)
    if series is None:
        return db.steps(run_id)
    return series(run_id, columns=STEP_COLUMNS, max_points=STEP_ROWS_PER_POINT * max_points)


def build_run_data(run: Any, steps: pd.DataFrame | None = None, evals: pd.DataFrame | None = None,
                   epochs: pd.DataFrame | None = None, checkpoints: pd.DataFrame | None = None,
                   events: pd.DataFrame | None = None, *, max_points: int = MAX_POINTS,
                   steps_reduced: bool = False) -> RunDashboardData:
    """The dashboard of ``run`` (an expdb RunRecord or anything with its attributes).

    ``steps_reduced``: ``steps`` may be a reduction (db.step_series), so a count of its
    non-finite values would be a count of the rows read, not of the run: notes give none.
    """
    exact = not steps_reduced
    config = run_config(run)
    val = validation_points(evals, epochs)
    title = build_title(run, config, evals if evals is not None and len(evals) else epochs)
    panels = (loss_panel(steps, epochs, val, max_points, exact, bpb_axis(evals, epochs)),
              perplexity_panel(steps, val, max_points, exact, word_perplexity_axis(evals, epochs)),
              lr_panel(steps, max_points, exact),
              grad_norm_panel(steps, float(config.get("grad_clip") or 0), max_points, exact),
              epoch_time_panel(epochs), memory_panel(epochs))
    if title.status != "running":           # "not yet" only while it may still come
        panels = tuple(_ended(p, title.status) for p in panels)
    return RunDashboardData(title, *panels, markers=build_markers(run, checkpoints, events))


def _ended(panel: Panel, status: str) -> Panel:
    ended = {NO_VALIDATION: f"no validation (run {status})",
             NO_EPOCHS: f"no epoch completed (run {status})"}
    return panel._replace(notes=tuple(ended.get(n, n) for n in panel.notes))


# -- step panels -----------------------------------------------------------------------------
def validation_points(evals: pd.DataFrame | None, epochs: pd.DataFrame | None, metric: str = "val_loss"
                      ) -> tuple[np.ndarray, np.ndarray, int]:
    """(step, ``metric``, dropped) from the evaluations, or from the epoch rows when there are none.

    An eval row exists only because an evaluation ran, so its nan is a non-finite loss (dropped);
    an epoch row's nan may just mean "not evaluated", so the fallback counts nothing as dropped.
    The bits per byte and word perplexity (``val_bpb``, ``val_word_ppl``) of runs recorded before
    they were measured are NULL: no points, nothing counted as dropped by the callers.
    """
    if evals is not None and len(evals):
        return finite_xy(column(evals, "step"), column(evals, metric))
    x, y, _ = finite_xy(column(epochs, "step"), column(epochs, metric))
    return x, y, 0


def bpb_axis(evals: pd.DataFrame | None, epochs: pd.DataFrame | None) -> SecondAxis | None:
    """Validation bits per byte against the loss panel's right axis: the measure that compares
    runs whose tokenizers differ. None for a run without it (recorded before it was measured)."""
    x, y, _ = validation_points(evals, epochs, "val_bpb")
    series = _series("val_bpb", "validation bits per byte", x, y, MAX_POINTS)
    return SecondAxis("bits per byte", (series,), padded_range(y)) if series else None


def word_perplexity_axis(evals: pd.DataFrame | None, epochs: pd.DataFrame | None) -> SecondAxis | None:
    """Validation perplexity per word (WikiText papers' measure) on a log axis of its own beside
    the perplexity per token: where words are few per token (code) it is orders of magnitude above,
    and on one axis it would flatten the token curves. None where the run did not measure it."""
    x, y, _ = validation_points(evals, epochs, "val_word_ppl")
    series = _series("val_word_ppl", "validation, per word", x, y, MAX_POINTS)
    if series is None:
        return None
    lo, hi = float(y.min()), float(y.max())
    return SecondAxis("perplexity per word", (series,), (lo / 1.3, hi * 1.3), log=True)


def padded_range(y: np.ndarray, headroom: float = 0.12) -> tuple[float, float]:
    """Fixed limits around ``y`` with ``headroom`` of the range (of the value, when flat) each side."""
    lo, hi = float(y.min()), float(y.max())
    pad = (hi - lo) * headroom or abs(hi) * headroom or 1.0
    return lo - pad, hi + pad


def loss_panel(steps, epochs, val, max_points: int, exact: bool = True,
               bpb: SecondAxis | None = None) -> Panel:
    sx, sy, s_drop = finite_xy(column(steps, "step"), column(steps, "loss"))
    ex, ey, e_drop = finite_xy(mid_epoch_steps(epochs), column(epochs, "train_loss"))
    vx, vy, v_drop = val
    series = (_series("train_step", "train (per step)", sx, sy, max_points),
              _series("train_epoch", "train (epoch mean, mid-epoch)", ex, ey),
              _series("val", "validation", vx, vy, max_points))
    notes = (_absent_note(steps, sx, NO_STEPS, "no finite training loss recorded"),
             _validation_note(vx, v_drop),
             _dropped_note(s_drop, "training loss", exact), _dropped_note(e_drop, "epoch mean loss"),
             _dropped_note(v_drop, "validation loss"))
    return Panel("Loss", "step", "loss (nats)", _present(series), _present(notes), second_axis=bpb)


def mid_epoch_steps(epochs: pd.DataFrame | None) -> np.ndarray:
    """The step halfway through each epoch (an epoch's mean belongs there, not at its end).

    An epoch row's ``step`` is the epoch's last step; the first epoch starts at step 0.
    """
    last = column(epochs, "step")
    if not last.size:
        return last
    order = np.argsort(column(epochs, "epoch"), kind="stable")
    first = np.empty_like(last)
    first[order] = np.concatenate(([0.0], last[order][:-1]))
    first[~np.isfinite(first)] = last[~np.isfinite(first)]    # unknown start: the end itself
    return (first + last) / 2


def perplexity_panel(steps, val, max_points: int, exact: bool = True, words: SecondAxis | None = None
                     ) -> Panel:
    """Per token (training, smoothed, and validation) and, where the run measured it (text with
    words, such as WikiText), validation perplexity per word on the right (``words``)."""
    sx, sy, _ = finite_xy(column(steps, "step"), column(steps, "loss"))
    window = smoothing_window(sy.size)
    # np.exp on whole series is trainer.metrics.perplexity's rule (inf past float64's range),
    # vectorised; an infinite perplexity is then dropped as non-finite and counted in a note
    with np.errstate(over="ignore"):
        tx, ty, t_drop = finite_xy(sx, np.exp(moving_average(sy, window)))
        vx, vy, v_drop = finite_xy(val[0], np.exp(val[1]))
    span = window * (sx[-1] - sx[0] + 1) / sx.size if sx.size else 0   # rows may be reduced
    label = "train, exp(mean loss" + (f" over ~{human_count(span)} steps)" if window > 1 else ")")
    series = (_series("train_smooth", label, tx, ty, max_points),
              _series("val", "validation", vx, vy, max_points))
    notes = (_absent_note(steps, sx, NO_STEPS, None), _validation_note(vx, val[2]),
             _dropped_note(t_drop, "training perplexity", exact),
             _dropped_note(v_drop, "validation perplexity"))
    return Panel("Perplexity", "step", "perplexity (exp of loss)", _present(series),
                 _present(notes), log_y=True, second_axis=words)


def lr_panel(steps, max_points: int, exact: bool = True) -> Panel:
    x, y, dropped = finite_xy(column(steps, "step"), column(steps, "lr"))
    notes = (_absent_note(steps, x, NO_STEPS, "no finite learning rate recorded"),
             _dropped_note(dropped * bool(x.size), "learning rate", exact, MISSING))
    return Panel("Learning rate", "step", "learning rate",
                 _present((_series("lr", "learning rate", x, y, max_points),)), _present(notes))


def grad_norm_panel(steps, grad_clip: float, max_points: int, exact: bool = True) -> Panel:
    x, y, dropped = finite_xy(column(steps, "step"), column(steps, "grad_norm"))
    series = (_series("grad", "gradient norm", x, y, max_points),
              Series("clip", f"clip = {grad_clip:g}", (), (grad_clip,)) if grad_clip > 0 and y.size
              else None)
    notes = (_absent_note(steps, x, NO_STEPS, "no finite gradient norm recorded"),
             _dropped_note(dropped * bool(x.size), "gradient norm", exact, MISSING))
    # a few huge spikes flatten a linear axis; a log axis shows them and the bulk
    spiky = y.size and np.median(y) > 0 and y.max() / np.median(y) > 50
    return Panel("Gradient norm", "step", "gradient norm (L2)", _present(series), _present(notes),
                 log_y=bool(spiky))


# -- epoch panels ----------------------------------------------------------------------------
DURATION_UNITS = ((7200.0, 3600.0, "hours"), (120.0, 60.0, "minutes"), (0.0, 1.0, "seconds"))


def epoch_time_panel(epochs) -> Panel:
    x, y, dropped = finite_xy(column(epochs, "epoch"), column(epochs, "epoch_seconds"))
    notes = (_absent_note(epochs, x, NO_EPOCHS, "epoch duration not recorded"),
             _dropped_note(dropped, "epoch duration"))
    longest = float(y.max()) if y.size else 0.0
    scale, unit = next((s, u) for limit, s, u in DURATION_UNITS if longest >= limit)
    return Panel("Epoch duration", "epoch", unit,
                 _present((_series("epoch_seconds", "wall time", x, y / scale),)), _present(notes),
                 by_step=False, from_zero=True)


def memory_panel(epochs) -> Panel:
    """GPU allocated/reserved/peak when the run recorded any (it ran on a GPU), else process RSS;
    GPU utilisation on a second axis when it was sampled, else a note saying why it is absent."""
    epoch = column(epochs, "epoch")
    gpu = _present(tuple(_series(f"mem_{name}", f"GPU {name}", *finite_xy(epoch, column(epochs, col))[:2])
                         for col, name in GPU_MEMORY))
    util = utilisation_axis(epochs)
    # no note before the first epoch (NO_EPOCHS says it), nor where utilisation is drawn
    util_note = None if util or not len(epoch) else GPU_UTIL_MISSING if gpu else GPU_UTIL_CPU
    if gpu:
        return Panel("GPU memory per epoch", "epoch", "MB", gpu, _present((util_note,)), by_step=False,
                     from_zero=True, second_axis=util)
    x, y, _ = finite_xy(epoch, column(epochs, "mem_process_mb"))
    note = _absent_note(epochs, x, NO_EPOCHS, "memory not recorded")
    return Panel("Process memory (RSS) per epoch", "epoch", "MB",
                 _present((_series("mem_process", "process RSS", x, y),)), _present((note, util_note)),
                 by_step=False, from_zero=True, second_axis=util)


def utilisation_axis(epochs) -> SecondAxis | None:
    """The run's GPU utilisation per epoch (mean over the epoch's samples and GPUs), 0-100 %."""
    series = _series("gpu_util", "GPU utilisation", *finite_xy(column(epochs, "epoch"),
                                                               column(epochs, "gpu_util_pct"))[:2])
    return SecondAxis("GPU utilisation (%)", (series,), (0.0, 100.0)) if series else None


# -- small helpers ---------------------------------------------------------------------------
def _series(role: str, label: str, x: np.ndarray, y: np.ndarray, max_points: int | None = None
            ) -> Series | None:
    if not y.size:
        return None
    if max_points:
        x, y = reduce_minmax(x, y, max_points)
    return Series(role, label, tuple(x.tolist()), tuple(y.tolist()))


def _absent_note(df: pd.DataFrame | None, x: np.ndarray, empty: str, unrecorded: str | None
                 ) -> str | None:
    if df is None or not len(df):
        return empty
    return None if x.size else unrecorded


def _validation_note(x: np.ndarray, dropped: int) -> str | None:
    if x.size:
        return None
    return "no finite validation loss" if dropped else NO_VALIDATION


def _dropped_note(n: int, what: str, exact: bool = True, kind: str = "non-finite") -> str | None:
    """``kind``: MISSING for metrics a trainer may leave out (NaN and NULL read alike)."""
    if not n:
        return None
    return f"{n} {kind} {what} value{'s' if n != 1 else ''} not drawn" if exact else \
        f"{kind} {what} values not drawn"


def _present(items: tuple) -> tuple:
    return tuple(i for i in items if i is not None)

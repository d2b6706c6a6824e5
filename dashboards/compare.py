"""Validation-loss curves of several runs on one plot: PNG (matplotlib) or HTML (plotly).

The HTML embeds plotly.js (about 5 MB) so it opens without a network connection.
"""
from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import IO, Any, NamedTuple, Sequence

import plotly.graph_objects as go
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter

from dashboards.data import RunDashboardData, validation_points
from dashboards.series import MAX_POINTS, reduce_minmax

DPI = 150
FORMATS = ("png", "html")
MAX_MARKERS = 150                        # more dots than this would hide the line
LINESTYLES = ("-", "--", ":")


class Curve(NamedTuple):
    run_id: int
    label: str
    x: tuple[float, ...]            # step
    y: tuple[float, ...]            # validation loss
    best: float | None              # the run's best validation loss


class ComparisonData(NamedTuple):
    title: str
    curves: tuple[Curve, ...]       # with points, best first
    notes: tuple[str, ...]          # runs left out, and why


def fetch_curve(db: Any, run_id: int) -> Curve:
    """One run's validation curve from an open expdb database (no step rows are read)."""
    return build_curve(db.run(run_id), db.evals(run_id), db.epochs(run_id))


def build_curve(run: Any, evals, epochs, max_points: int = MAX_POINTS) -> Curve:
    x, y, _ = validation_points(evals, epochs)
    x, y = reduce_minmax(x, y, max_points)
    best = getattr(run, "best_val_loss", None)
    if best is None or not math.isfinite(best):
        best = float(y.min()) if y.size else None
    return Curve(int(run.id), curve_label(run.id, run.name, getattr(run, "trial_number", None)),
                 tuple(x.tolist()), tuple(y.tolist()), best)


def curve_from_dashboard(data: RunDashboardData) -> Curve:
    val = data.validation
    x, y = (val.x, val.y) if val else ((), ())
    t = data.title
    return Curve(t.run_id, curve_label(t.run_id, t.name, t.trial), x, y, min(y) if y else None)


def curve_label(run_id: int, name: str, trial: int | None) -> str:
    return f"run {run_id} {name}" + (f" (trial {trial})" if trial is not None else "")


def build_comparison(items: Sequence[RunDashboardData | Curve], title: str = "Validation loss"
                     ) -> ComparisonData:
    """Curves sorted best first; runs without validation become notes."""
    curves = [curve_from_dashboard(i) if isinstance(i, RunDashboardData) else i for i in items]
    shown = sorted((c for c in curves if c.x), key=lambda c: (c.best is None, c.best, c.run_id))
    notes = tuple(f"{c.label}: no validation yet" for c in curves if not c.x)
    return ComparisonData(title, tuple(shown), notes)


def render_comparison(items: ComparisonData | Sequence[RunDashboardData | Curve],
                      out: str | os.PathLike | IO[bytes], fmt: str | None = None) -> None:
    """Write PNG or HTML (``fmt``, else the suffix of ``out``; file objects default to PNG)."""
    data = items if isinstance(items, ComparisonData) else build_comparison(items)
    fmt = fmt or (Path(out).suffix.lstrip(".").lower() if isinstance(out, (str, os.PathLike)) else "png")
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: use one of {', '.join(FORMATS)}")
    payload = _html_bytes(data) if fmt == "html" else _png_bytes(data)
    if isinstance(out, (str, os.PathLike)):
        Path(out).write_bytes(payload)        # rendered in full first: no half-written file
    else:
        out.write(payload)


def comparison_figure(data: ComparisonData) -> Figure:
    fig = Figure(figsize=(12, 6.5), layout="constrained")
    ax = fig.subplots()
    for i, c in enumerate(data.curves):
        ax.plot(c.x, c.y, marker="o" if len(c.x) <= MAX_MARKERS else None, ms=3, lw=1.4,
                ls=LINESTYLES[i // 10 % len(LINESTYLES)], label=_legend_label(c))  # 10 colours
    ax.set(title=data.title, xlabel="step", ylabel="validation loss (nats)")
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))         # 200k, 1M
    ax.grid(True, alpha=0.3)
    if data.curves:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, title="best first")
    else:
        ax.text(0.5, 0.5, "no run has validation results yet", transform=ax.transAxes,
                ha="center", va="center", fontsize=12, color="dimgray", style="italic")
    if data.notes:                       # under the legend, outside the plot
        ax.text(1.01, 0.0, "\n".join(data.notes), transform=ax.transAxes, ha="left",
                va="bottom", fontsize=8, color="dimgray")
    return fig


def comparison_plotly(data: ComparisonData) -> go.Figure:
    fig = go.Figure([go.Scatter(x=c.x, y=c.y, mode="lines+markers", name=_legend_label(c))
                     for c in data.curves])
    fig.update_layout(title=data.title, xaxis_title="step", yaxis_title="validation loss (nats)",
                      template="plotly_white", legend_title_text="best first")
    for i, note in enumerate(data.notes or (() if data.curves else ("no run has validation results yet",))):
        fig.add_annotation(text=note, xref="paper", yref="paper", x=0, y=-0.12 - 0.05 * i,
                           showarrow=False, font=dict(color="gray"))
    return fig


def _legend_label(c: Curve) -> str:
    return c.label + (f"  best {c.best:.4g}" if c.best is not None else "")


def _png_bytes(data: ComparisonData) -> bytes:
    buf = io.BytesIO()
    comparison_figure(data).savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _html_bytes(data: ComparisonData) -> bytes:
    return comparison_plotly(data).to_html(include_plotlyjs=True, full_html=True).encode("utf-8")

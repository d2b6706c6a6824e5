"""Draw a ``RunDashboardData`` as one six-panel PNG with matplotlib.

Uses ``matplotlib.figure.Figure`` directly (no pyplot): no global figure state, no GUI backend,
nothing to close. Everything about the data (what to draw, which notes) is in the records.
"""
from __future__ import annotations

import io
import os
from typing import IO, Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, MaxNLocator

from dashboards.data import Marker, Panel, RunDashboardData, Series, Title

DPI = 150
FIGSIZE = (18, 10)    # inches: 2700 x 1500 pixels at 150 dpi
MAX_LINE_MARKERS = 150

# role -> how to draw it; "kind" picks the Axes method
STYLES: dict[str, dict[str, Any]] = {
    "train_step": dict(kind="plot", color="tab:blue", lw=0.8, alpha=0.5),
    "train_smooth": dict(kind="plot", color="tab:blue", lw=1.6),
    "train_epoch": dict(kind="plot", color="navy", marker="o", ls="none", ms=6, zorder=3),
    "val": dict(kind="plot", color="tab:orange", marker="o", ms=4, lw=1.6, zorder=4),
    "lr": dict(kind="plot", color="tab:green", lw=1.4),
    "grad": dict(kind="plot", color="tab:purple", lw=0.8),
    "clip": dict(kind="axhline", color="tab:red", ls="--", lw=1.2),
    "epoch_seconds": dict(kind="bar", color="tab:cyan", width=0.8, edgecolor="black", lw=0.5),
    "mem_allocated": dict(kind="plot", color="tab:blue", marker="o", ms=4),
    "mem_reserved": dict(kind="plot", color="tab:orange", marker="s", ms=4),
    "mem_peak": dict(kind="plot", color="tab:red", marker="^", ms=4),
    "mem_process": dict(kind="plot", color="tab:brown", marker="o", ms=4),
}
MARKER_STYLES: dict[str, dict[str, Any]] = {
    "resume": dict(color="tab:green", ls=":", lw=1.4, label="resume"),
    "oom": dict(color="tab:red", ls="--", lw=1.2, label="out of memory"),
    "nonfinite": dict(color="magenta", ls="-.", lw=1.0, label="non-finite loss/grad"),
    "best": dict(color="goldenrod", ls="-", lw=1.8, label="best checkpoint"),
}


def render_run_dashboard(data: RunDashboardData, out: str | os.PathLike | IO[bytes]) -> None:
    """Save the dashboard as a 150-dpi PNG to a path or a binary file object."""
    fig = build_figure(data)
    if isinstance(out, (str, os.PathLike)):
        buf = io.BytesIO()              # render fully first: a failure leaves no half-written file
        fig.savefig(buf, format="png", dpi=DPI)
        with open(out, "wb") as f:
            f.write(buf.getvalue())
    else:
        fig.savefig(out, format="png", dpi=DPI)


def build_figure(data: RunDashboardData) -> Figure:
    """The dashboard as a Figure (2 rows x 3 panels) for saving or inspection in tests."""
    fig = Figure(figsize=FIGSIZE, layout="constrained")
    axes = fig.subplots(2, 3)
    for ax, panel in zip(axes.flat, data.panels):
        draw_panel(ax, panel)
        if panel.by_step:
            draw_markers(ax, data.markers, legend=panel is data.loss)
        finish_axes(ax, panel)
    fig.suptitle(title_text(data.title), fontsize=13)
    return fig


def title_text(title: Title) -> str:
    line = f"{title.name}  \u00b7  run {title.run_id}  \u00b7  {title.status}"
    if title.study:
        line += f"  \u00b7  study {title.study}"
        line += f", trial {title.trial}" if title.trial is not None else ""
    params = "   ".join(f"{k} {v}" for k, v in title.hparams)
    return f"{line}\n{params}" if params else line


def draw_panel(ax: Axes, panel: Panel) -> None:
    for series in panel.series:
        draw_series(ax, series)
    ax.set_title(panel.title, fontsize=12, fontweight="bold")
    ax.set_xlabel(panel.xlabel)
    ax.set_ylabel(panel.ylabel)


def draw_series(ax: Axes, s: Series) -> None:
    style = dict(STYLES[s.role])
    kind = style.pop("kind")
    if kind == "axhline":
        ax.axhline(s.y[0], label=s.label, **style)
    elif kind == "bar":
        ax.bar(s.x, s.y, label=s.label, **style)
    else:
        if len(s.x) == 1 and "marker" not in style:     # a lone point of a line is invisible
            style.update(marker="o", ms=5)
        if len(s.x) > MAX_LINE_MARKERS and style.get("ls") != "none":
            style.pop("marker", None)                    # hundreds of dots would hide the line
        ax.plot(s.x, s.y, label=s.label, **style)


def draw_markers(ax: Axes, markers: tuple[Marker, ...], legend: bool) -> None:
    """Vertical lines at event steps; labelled (once per kind) only where ``legend`` is set."""
    labelled: set[str] = set()
    for m in markers:
        style = dict(MARKER_STYLES.get(m.kind, dict(color="gray", ls=":", label=m.kind)))
        label = style.pop("label")
        show = legend and m.kind not in labelled
        labelled.add(m.kind)
        ax.axvline(m.step, alpha=0.8, label=label if show else None, **style)


def finish_axes(ax: Axes, panel: Panel) -> None:
    has_data = any(s.y for s in panel.series if s.role != "clip")
    if panel.log_y and has_data:
        ax.set_yscale("log")
    if panel.from_zero and has_data:
        ax.set_ylim(bottom=0)
    format_x(ax, panel)
    if not has_data:
        ax.set_xticks([])
        ax.set_yticks([])
    ax.grid(True, which="major", alpha=0.3)
    if len(ax.get_legend_handles_labels()[0]) > 1:          # one entry would repeat the title
        ax.legend(loc="best", fontsize=8, framealpha=0.85)
    if panel.notes:
        draw_notes(ax, panel.notes, centred=not has_data)


def format_x(ax: Axes, panel: Panel) -> None:
    """Whole-number ticks (steps and epochs), never a fractional axis around a single point."""
    xs = sorted({x for s in panel.series for x in s.x})
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 2.5, 5, 10]))
    if panel.by_step:
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))   # 200k, 1M instead of 1e6 offsets
    elif 0 < len(xs) <= 20:
        ax.set_xticks(xs)
    lo, hi = ax.get_xlim()
    if xs and hi - lo < 2:
        ax.set_xlim(xs[0] - 1, xs[-1] + 1)


def draw_notes(ax: Axes, notes: tuple[str, ...], centred: bool) -> None:
    text = "\n".join(notes)
    if centred:
        ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center",
                fontsize=12, color="dimgray", style="italic")
    else:
        ax.text(0.02, 0.03, text, transform=ax.transAxes, ha="left", va="bottom", fontsize=8,
                color="dimgray", bbox=dict(boxstyle="round", fc="white", ec="lightgray", alpha=0.9))

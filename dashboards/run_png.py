"""Draw a ``RunDashboardData`` as one six-panel PNG with matplotlib.

Uses ``matplotlib.figure.Figure`` directly (no pyplot): no global figure state, no GUI backend,
nothing to close. Everything about the data (what to draw, which notes) is in the records.
The layout is a fixed grid (no constrained layout, which draws the figure more than once) and
the PNG is compressed at zlib level 1: together about a third of the time of a render.
"""
from __future__ import annotations

import io
import os
from typing import IO, Any

import numpy as np

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, LogFormatter, LogLocator, MaxNLocator

from dashboards.output import emit
from dashboards.run_records import Marker, Panel, RunDashboardData, SecondAxis, Series
from dashboards.style import DPI, FIGURE_WIDTH_IN, NOTE_COLOR, ROLE_COLORS, event_style

FIGSIZE = (FIGURE_WIDTH_IN, 10)    # inches: 2700 x 1500 pixels at 150 dpi
GRID = dict(left=0.045, right=0.99, bottom=0.055, top=0.885, wspace=0.2, hspace=0.3)
SECOND_AXIS_RIGHT = 0.965   # GRID's right edge when a last-column panel's right axis needs its labels
SECOND_AXIS_WSPACE = 0.3    # GRID's gap when another panel's right axis labels sit between two panels
PNG_OPTIONS = dict(format="png", dpi=DPI, pil_kwargs={"compress_level": 1})
MAX_LINE_MARKERS = 150
HEADROOM = 0.12       # fraction of the data range left free above and below the data

# role -> how to draw it (its colour: dashboards.style); "kind" picks the Axes method
STYLES: dict[str, dict[str, Any]] = {
    "train_step": dict(kind="plot", lw=0.8, alpha=0.5),
    "train_smooth": dict(kind="plot", lw=1.6),
    "train_epoch": dict(kind="plot", marker="o", ls="none", ms=6, zorder=3),
    "val": dict(kind="plot", marker="o", ms=4, lw=1.6, zorder=4),
    "lr": dict(kind="plot", lw=1.4),
    "grad": dict(kind="plot", lw=0.8),
    "clip": dict(kind="axhline", ls="--", lw=1.2),
    "epoch_seconds": dict(kind="bar", width=0.8, edgecolor="black", lw=0.5),
    "mem_allocated": dict(kind="plot", marker="o", ms=4),
    "mem_reserved": dict(kind="plot", marker="s", ms=4),
    "mem_peak": dict(kind="plot", marker="^", ms=4),
    "mem_process": dict(kind="plot", marker="o", ms=4),
    "gpu_util": dict(kind="plot", marker="D", ms=4, ls="--", lw=1.4),
    "val_bpb": dict(kind="plot", marker="s", ms=4, ls="--", lw=1.6, zorder=4),
    "val_word_ppl": dict(kind="plot", marker="^", ms=4, ls=":", lw=1.6, zorder=4),
}
MARKER_WIDTHS = {"resume": 1.4, "oom": 1.2, "gradient_checkpointing": 1.2, "nonfinite": 1.0, "best": 1.8,
                 "early_stop": 2.0}   # event -> line width


def render_run_dashboard(data: RunDashboardData, out: str | os.PathLike | IO[bytes]) -> None:
    """Save the dashboard as a 150-dpi PNG to a path (atomically) or a binary file object."""
    buf = io.BytesIO()
    build_figure(data).savefig(buf, **PNG_OPTIONS)
    emit(out, buf.getvalue())


def build_figure(data: RunDashboardData) -> Figure:
    """The dashboard as a Figure (2 rows x 3 panels) for saving or inspection in tests."""
    fig = Figure(figsize=FIGSIZE)
    right = SECOND_AXIS_RIGHT if any(p.second_axis for p in data.panels[2::3]) else GRID["right"]
    inner = [p for i, p in enumerate(data.panels) if i % 3 != 2]
    wspace = SECOND_AXIS_WSPACE if any(p.second_axis for p in inner) else GRID["wspace"]
    axes = fig.add_gridspec(2, 3, **{**GRID, "right": right, "wspace": wspace}).subplots()
    # the markers' legend goes on the first step panel with data (the loss, unless it has none)
    keyed = next((p for p in data.panels if p.by_step and p.has_data), None)
    for ax, panel in zip(axes.flat, data.panels):
        draw_panel(ax, panel)
        twin = draw_second_axis(ax, panel.second_axis)
        if panel.by_step and panel.has_data:
            draw_markers(ax, data.markers, legend=panel is keyed)
        finish_axes(ax, panel, twin)
    fig.suptitle(data.title.text, fontsize=13)
    return fig


def draw_panel(ax: Axes, panel: Panel) -> None:
    for series in panel.series:
        draw_series(ax, series)
    ax.set_title(panel.title, fontsize=12, fontweight="bold", y=1.0, pad=8)   # y: no auto-placement pass
    ax.set_xlabel(panel.xlabel)
    ax.set_ylabel(panel.ylabel)


def draw_second_axis(ax: Axes, axis: SecondAxis | None) -> Axes | None:
    """``axis``'s series against a y axis of their own on the right (a twin sharing x)."""
    if axis is None:
        return None
    twin = ax.twinx()
    for series in axis.series:
        draw_series(twin, series)
    if axis.log:
        set_log_y(twin)
    twin.set_ylim(*axis.limits)
    twin.set_ylabel(axis.label)
    return twin


def draw_series(ax: Axes, s: Series) -> None:
    style = dict(STYLES[s.role], color=ROLE_COLORS[s.role])
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
        style = event_style(m.kind)
        show = legend and m.kind not in labelled
        labelled.add(m.kind)
        ax.axvline(m.step, color=style.color, ls=style.mpl_dash, lw=MARKER_WIDTHS.get(m.kind, 1.5), alpha=0.8,
                   label=style.label if show else None)


def finish_axes(ax: Axes, panel: Panel, twin: Axes | None = None) -> None:
    if panel.log_y and panel.has_data:
        set_log_y(ax)
    elif panel.has_data:
        set_ylim(ax, panel)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 5))   # 1e-3 above, not 0.00110
    format_x(ax, panel)
    if not panel.has_data:
        ax.set_xticks([])
        ax.set_yticks([])
    ax.grid(True, which="major", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if twin is not None:            # one legend for both axes, on the twin, which is drawn over ax
        handles, labels = [a + b for a, b in zip((handles, labels), twin.get_legend_handles_labels())]
    if len(handles) > 1:            # one entry would repeat the title
        # "best" tests every position against thousands of points; a falling curve leaves the
        # upper right free, and epoch panels have few points
        (twin or ax).legend(handles, labels, loc="upper right" if panel.by_step else "best", fontsize=8,
                            framealpha=0.85)
    if panel.notes:
        draw_notes(ax, panel.notes, centred=not panel.has_data)


def set_log_y(ax: Axes) -> None:
    """Log y with plain labels (100, 2000: no mathtext to parse) and minor ticks at 2 and 5
    only (labelled when the axis spans under two decades, so a narrow range still reads)."""
    ax.set_yscale("log")
    ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
    ax.yaxis.set_major_formatter(LogFormatter())
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def set_ylim(ax: Axes, panel: Panel) -> None:
    """Limits with room above the data: no point on the frame, a flat line in plain view."""
    lo, hi = y_range(panel)
    ax.set_ylim(*padded(lo, hi, panel.from_zero))


def y_range(panel: Panel) -> tuple[float, float]:
    ys = np.concatenate([np.asarray(s.y, dtype=float) for s in panel.series])
    return float(ys.min()), float(ys.max())


def padded(lo: float, hi: float, from_zero: bool) -> tuple[float, float]:
    """(bottom, top) around [lo, hi]: HEADROOM of the range, or of the value when it is flat."""
    if from_zero and lo >= 0:
        return 0.0, hi * (1 + HEADROOM) if hi > 0 else 1.0
    pad = (hi - lo) * HEADROOM or abs(hi) * HEADROOM or 1.0
    return lo - pad, hi + pad


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
                fontsize=12, color=NOTE_COLOR, style="italic")
    else:
        ax.text(0.02, 0.03, text, transform=ax.transAxes, ha="left", va="bottom", fontsize=8,
                color=NOTE_COLOR, bbox=dict(boxstyle="round", fc="white", ec="lightgray", alpha=0.9))

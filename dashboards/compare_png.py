"""Draw a ``ComparisonData`` as a PNG with matplotlib (``compare_html`` draws the HTML page).

Top row: validation curves of the best runs (the rest thin and grey behind them) and the best
perplexity of every run; below, one scatter per differing hyperparameter against the objective.
A run's state picks its marker and colour everywhere: pruned trials are orange crosses, and a
pruned curve is dashed and ends in a cross at the step where it was stopped.
"""
from __future__ import annotations

import io
import math
import os
from typing import IO

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, MaxNLocator

from dashboards.compare_data import ComparisonData, Curve, ParamPoints, shown_notes
from dashboards.output import emit
from dashboards.style import DPI, FIGURE_WIDTH_IN, NOTE_COLOR, OTHER_STATE, PARAM_COLS, STATES, state_style

LINESTYLES = {"completed": "-", "pruned": "--"}


def render_comparison_png(data: ComparisonData, out: str | os.PathLike | IO[bytes]) -> None:
    """Save the comparison as a PNG to a path (atomically) or a binary file object."""
    buf = io.BytesIO()
    comparison_figure(data).savefig(buf, format="png", dpi=DPI)
    emit(out, buf.getvalue())


def comparison_figure(data: ComparisonData) -> Figure:
    rows = math.ceil(len(data.params) / PARAM_COLS)
    fig = Figure(figsize=(FIGURE_WIDTH_IN, 6.5 + 3.6 * rows), layout="constrained")
    grid = fig.add_gridspec(1 + rows, PARAM_COLS, height_ratios=[1.8] + [1] * rows)
    draw_curves(fig.add_subplot(grid[0, :3]), data)
    draw_bests(fig.add_subplot(grid[0, 3]), data)
    for i, p in enumerate(data.params):
        draw_param(fig.add_subplot(grid[1 + i // PARAM_COLS, i % PARAM_COLS]), p, legend=i == 0,
                   objective=data.info.objective)
    notes = shown_notes(data)
    fig.suptitle(data.title, fontsize=14)
    if notes:
        fig.supxlabel("\n".join(notes), fontsize=9, color=NOTE_COLOR, ha="left", x=0.01)
    return fig


def draw_curves(ax: Axes, data: ComparisonData) -> None:
    for c in data.background:
        ax.plot(c.x, c.y, color="0.6", lw=0.8, alpha=0.6, zorder=1)
        _end_mark(ax, c, color="0.6", size=5)
    for i, c in enumerate(data.curves):
        line, = ax.plot(c.x, c.y, lw=1.6, ls=LINESTYLES.get(c.state, ":"), zorder=3,
                        color=f"C{i % 10}", marker="o" if len(c.x) <= 60 else None, ms=3,
                        label=f"{c.label}  best {c.best:.4g}" if c.best is not None else c.label)
        _end_mark(ax, c, color=line.get_color(), size=9)
    more = f", {len(data.background)} more in grey" if data.background else ""
    ax.set_title(f"{data.info.name} of the best {len(data.curves)} runs{more}", fontweight="bold")
    ax.set(xlabel="step", ylabel=data.info.curve_label)
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.grid(True, alpha=0.3)
    if data.curves:
        ax.legend(loc="upper right", fontsize=8, title="best first; pruned: dashed, \u2716 where stopped",
                  title_fontsize=8, framealpha=0.9)
    else:
        _centred(ax, "no run has validation results yet")


def _end_mark(ax: Axes, c: Curve, color: str, size: float) -> None:
    if c.state == "pruned" and c.x:
        ax.plot(c.x[-1], c.y[-1], marker="X", ms=size, color=color, ls="none", zorder=4)


def draw_bests(ax: Axes, data: ComparisonData) -> None:
    ax.set_title(data.info.bests_title, fontweight="bold")
    ax.set(xlabel="trial" if data.trials and data.trials[0].label.startswith("t") else "run",
           ylabel=data.info.bests_label)
    have = {t.run_id: t.best for t in data.trials if t.best is not None and math.isfinite(t.best)}
    if not have:
        _centred(ax, "no run has validation results yet")
        return
    x = np.arange(len(data.trials))
    heights = [have.get(t.run_id, 0.0) for t in data.trials]
    ax.bar(x, heights, color=[state_style(t.state).color for t in data.trials],
           edgecolor="black", lw=0.4)
    for xi, t in zip(x, data.trials):
        if t.run_id not in have:
            ax.text(xi, 0, "n/a", ha="center", va="bottom", fontsize=7, rotation=90, color=NOTE_COLOR)
    ax.set_xticks(x, [t.label for t in data.trials], rotation=90 if len(x) > 12 else 0,
                  fontsize=8 if len(x) > 12 else 9)
    values = list(have.values())
    if max(values) / min(values) > 20:
        ax.set_yscale("log")
    else:
        ax.set_ylim(0, max(values) * 1.12)
    _state_legend(ax, {t.state for t in data.trials}, kind="bar")
    ax.grid(True, axis="y", alpha=0.3)


def draw_param(ax: Axes, p: ParamPoints, legend: bool = True, objective: str = "best validation loss (nats)"
               ) -> None:
    positions, ticks = _x_positions(p)
    for state in dict.fromkeys(p.states):
        idx = [i for i, s in enumerate(p.states) if s == state]
        st = state_style(state)
        ax.scatter([positions[i] for i in idx], [p.objective[i] for i in idx], c=st.color,
                   marker=st.marker, s=36, label=state, edgecolors="black", linewidths=0.3)
    if ticks:
        ax.set_xticks(range(len(ticks)), ticks)
        ax.set_xlim(-0.6, len(ticks) - 0.4)
    elif p.log_x:
        ax.set_xscale("log")
    elif all(float(v).is_integer() for v in p.values):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))    # layers, steps: no 1.5
    else:
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 5), useMathText=True)
    ax.set_title(p.name, fontweight="bold")
    ax.set(xlabel=f"{p.name}{' (log scale)' if p.log_x else ''}", ylabel=objective)
    ax.grid(True, alpha=0.3)
    if legend and len(set(p.states)) > 1:             # the same states in every panel: once
        ax.legend(fontsize=7, loc="best")


def _x_positions(p: ParamPoints) -> tuple[list[float], list[str]]:
    if not p.categorical:
        return list(p.values), []
    ticks = sorted(set(p.values))
    return [float(ticks.index(v)) for v in p.values], ticks


def _state_legend(ax: Axes, states: set[str], kind: str) -> None:
    from matplotlib.patches import Patch

    handles = [Patch(color=state_style(s).color, label=s) for s in STATES if s in states]
    handles += [Patch(color=OTHER_STATE.color, label=s) for s in sorted(states - set(STATES))]
    ax.legend(handles=handles, fontsize=8, loc="upper right", framealpha=0.9)


def _centred(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=12,
            color=NOTE_COLOR, style="italic")

"""Draw a ``RunDashboardData`` as an interactive HTML page with plotly (zoom, hover, toggle).

Same records and panels as the PNG (``dashboards.run_png``); long step series arrive already
reduced (min/max per bucket), and are handed to plotly as numpy arrays, which it stores as
base64 binary instead of decimal text, so a 1,000,000-step run is a page of about 100 kB
(plus plotly.js, see ``dashboards.output``).
"""
from __future__ import annotations

import math
import os
from typing import IO, Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from dashboards.output import html_page, write_html
from dashboards.run_records import Marker, Panel, RunDashboardData, SecondAxis, Series
from dashboards.style import NOTE_COLOR, ROLE_COLORS, event_style

ROWS, COLS = 2, 3
LINE = dict(mode="lines")
# role -> plotly Scatter options; the colour of each role is dashboards.style's
STYLES: dict[str, dict[str, Any]] = {
    "train_step": dict(LINE, line=dict(width=1), opacity=0.5),
    "train_smooth": dict(LINE, line=dict(width=2)),
    "train_epoch": dict(mode="markers", marker=dict(size=9)),
    "val": dict(mode="lines+markers", line=dict(width=2), marker=dict(size=5)),
    "lr": dict(LINE, line=dict(width=2)),
    "grad": dict(LINE, line=dict(width=1)),
    "mem_allocated": dict(mode="lines+markers", marker=dict(symbol="circle")),
    "mem_reserved": dict(mode="lines+markers", marker=dict(symbol="square")),
    "mem_peak": dict(mode="lines+markers", marker=dict(symbol="triangle-up")),
    "mem_process": dict(mode="lines+markers"),
    "gpu_util": dict(mode="lines+markers", line=dict(dash="dash"), marker=dict(symbol="diamond")),
    "val_bpb": dict(mode="lines+markers", line=dict(width=2, dash="dash"), marker=dict(size=5, symbol="square")),
    "val_word_ppl": dict(mode="lines+markers", line=dict(width=2, dash="dot"),
                         marker=dict(size=6, symbol="triangle-up")),
}


def render_run_html(data: RunDashboardData, out: str | os.PathLike | IO[bytes],
                    plotlyjs: str = "directory", refresh_s: float | None = None) -> None:
    """Write the dashboard as an HTML page (see ``dashboards.output`` for ``plotlyjs``).

    ``refresh_s``: the page reloads itself that often (``--watch`` on a running run).
    """
    body = run_figure(data).to_html(full_html=False, include_plotlyjs=False)
    head = f'<meta http-equiv="refresh" content="{math.ceil(refresh_s)}">\n' if refresh_s else ""
    write_html(out, html_page(data.title.text.splitlines()[0], [body], plotlyjs, head), plotlyjs)


def run_figure(data: RunDashboardData) -> go.Figure:
    """The six panels as one plotly figure."""
    # a secondary y axis only where a panel has one: each one takes an axis number
    specs = [[{"secondary_y": p.second_axis is not None} for p in data.panels[r * COLS:(r + 1) * COLS]]
             for r in range(ROWS)]
    fig = make_subplots(rows=ROWS, cols=COLS, subplot_titles=[p.title for p in data.panels], specs=specs,
                        horizontal_spacing=0.07, vertical_spacing=0.13)
    shown: set[str] = set()
    for i, panel in enumerate(data.panels):
        row, col = divmod(i, COLS)
        xs = [x for s in panel.series for x in (s.x[:1] + s.x[-1:])]
        for s in panel.series:
            add_series(fig, s, row + 1, col + 1, shown, (min(xs), max(xs)) if xs else (0, 1))
        if panel.second_axis is not None:
            add_second_axis(fig, panel.second_axis, row + 1, col + 1, shown)
        if panel.by_step and panel.has_data:
            add_markers(fig, data.markers, row + 1, col + 1, shown)
        finish_axes(fig, panel, row + 1, col + 1)
    title = data.title.text.replace("\n", "<br><sup>") + "</sup>" * ("\n" in data.title.text)
    fig.update_layout(title=dict(text=title, x=0.5), template="plotly_white", height=900,
                      hovermode="closest", legend=dict(orientation="h", y=-0.08),
                      margin=dict(t=110))
    return fig


def add_second_axis(fig: go.Figure, axis: SecondAxis, row: int, col: int, shown: set[str]) -> None:
    """``axis``'s series on the panel's secondary y axis (the right), with its label and limits."""
    for s in axis.series:
        add_series(fig, s, row, col, shown, secondary_y=True)
    limits = [math.log10(v) for v in axis.limits] if axis.log else list(axis.limits)   # plotly: log10 units
    fig.update_yaxes(title_text=axis.label, range=limits, type="log" if axis.log else None, showgrid=False,
                     row=row, col=col, secondary_y=True)


def add_series(fig: go.Figure, s: Series, row: int, col: int, shown: set[str],
               x_span: tuple[float, float] = (0.0, 1.0), secondary_y: bool = False) -> None:
    common = dict(name=s.label, legendgroup=s.label, showlegend=s.label not in shown)
    shown.add(s.label)
    if s.role == "clip":                   # a trace, not a shape: it gets a legend entry and hover
        fig.add_trace(go.Scatter(x=list(x_span), y=[s.y[0]] * 2, mode="lines",
                                 line=dict(color=ROLE_COLORS["clip"], dash="dash", width=1), **common),
                      row=row, col=col)
        return
    x, y = np.asarray(s.x, dtype=float), np.asarray(s.y, dtype=float)
    if s.role == "epoch_seconds":
        fig.add_trace(go.Bar(x=x, y=y, marker_color=ROLE_COLORS[s.role], **common), row=row, col=col)
    else:
        fig.add_trace(go.Scatter(x=x, y=y, **_colored(STYLES[s.role], ROLE_COLORS[s.role]), **common),
                      row=row, col=col, secondary_y=secondary_y)


def _colored(style: dict[str, Any], color: str) -> dict[str, Any]:
    """``style`` with ``color`` on its line and its markers."""
    return dict(style, line=dict(style.get("line", {}), color=color),
                marker=dict(style.get("marker", {}), color=color))


def add_markers(fig: go.Figure, markers: tuple[Marker, ...], row: int, col: int,
                shown: set[str]) -> None:
    """Vertical lines at event steps, each kind named once in the legend."""
    for m in markers:
        style = event_style(m.kind)
        line, name = dict(color=style.color, dash=style.plotly_dash, width=1.5), style.label
        fig.add_vline(x=m.step, line=line, row=row, col=col)
        if name not in shown:              # shapes have no legend entry: an empty trace does
            shown.add(name)
            fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", line=line, name=name),
                          row=row, col=col)


def finish_axes(fig: go.Figure, panel: Panel, row: int, col: int) -> None:
    primary = dict(row=row, col=col, secondary_y=False) if panel.second_axis else dict(row=row, col=col)
    fig.update_xaxes(title_text=panel.xlabel, row=row, col=col,
                     dtick=None if panel.by_step else 1)
    small = panel.has_data and max(abs(v) for s in panel.series for v in s.y) < 0.01
    fig.update_yaxes(title_text=panel.ylabel, **primary,
                     type="log" if panel.log_y and panel.has_data else None,
                     exponentformat="e" if small else None)          # 5e-4, not 500µ
    if panel.from_zero and panel.has_data:
        top = max(max(s.y) for s in panel.series if s.role != "clip")
        fig.update_yaxes(range=[0, top * 1.12 if top > 0 else 1], **primary)
    if panel.notes:
        xref, yref = _axis_refs(fig, row, col)
        centred = not panel.has_data
        fig.add_annotation(text="<br>".join(panel.notes), showarrow=False,
                           xref=f"{xref} domain", yref=f"{yref} domain",
                           x=0.5 if centred else 0.02, y=0.5 if centred else 0.03,
                           xanchor="center" if centred else "left",
                           yanchor="middle" if centred else "bottom",
                           font=dict(color=NOTE_COLOR, size=14 if centred else 11),
                           bgcolor="rgba(255,255,255,0.85)")


def _axis_refs(fig: go.Figure, row: int, col: int) -> tuple[str, str]:
    """("x6", "y6"): the names of a panel's primary axes (secondary axes shift the numbering)."""
    subplot = fig.get_subplot(row, col)
    return subplot.xaxis.plotly_name.replace("axis", ""), subplot.yaxis.plotly_name.replace("axis", "")

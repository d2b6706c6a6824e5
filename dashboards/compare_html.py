"""``ComparisonData`` as an interactive plotly page: the panels of the PNG, with hover text
naming each run, and a click on a legend entry hiding that run or state."""
from __future__ import annotations

import math
import os
from typing import IO

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from dashboards.compare_data import OBJECTIVE, ComparisonData, ParamPoints, shown_notes
from dashboards.output import html_page, write_html
from dashboards.style import NOTE_COLOR, PARAM_COLS, STATES, state_style

DASHES = {"completed": "solid", "pruned": "dash"}


def render_comparison_html(data: ComparisonData, out: str | os.PathLike | IO[bytes],
                           plotlyjs: str = "directory") -> None:
    body = comparison_plotly(data).to_html(full_html=False, include_plotlyjs=False)
    write_html(out, html_page(data.title, [body], plotlyjs), plotlyjs)


def comparison_plotly(data: ComparisonData) -> go.Figure:
    rows = math.ceil(len(data.params) / PARAM_COLS)
    specs = [[{"colspan": 3}, None, None, {}]] + [[{}] * PARAM_COLS for _ in range(rows)]
    titles = [f"{data.info.name} of the best {len(data.curves)} runs", data.info.bests_title]
    titles += [p.name for p in data.params]
    fig = make_subplots(rows=1 + rows, cols=PARAM_COLS, specs=specs, subplot_titles=titles,
                        row_heights=[1.8] + [1] * rows, vertical_spacing=0.25 / (1 + rows),
                        horizontal_spacing=0.06)
    add_curves(fig, data)
    add_bests(fig, data)
    for i, p in enumerate(data.params):
        add_param(fig, p, 2 + i // PARAM_COLS, 1 + i % PARAM_COLS, data.info.objective)
    notes = shown_notes(data)
    fig.update_layout(title=dict(text=data.title, x=0.5), template="plotly_white",
                      height=520 + 300 * rows, legend=dict(font=dict(size=10)),
                      margin=dict(b=60 + 18 * len(notes)))
    for i, note in enumerate(notes):
        fig.add_annotation(text=note, xref="paper", yref="paper", x=0, y=0, yshift=-40 - 18 * i,
                           showarrow=False, xanchor="left", font=dict(color=NOTE_COLOR))
    return fig


def add_curves(fig: go.Figure, data: ComparisonData) -> None:
    hover = data.info.hover
    for c in data.background:
        fig.add_trace(go.Scatter(x=np.asarray(c.x), y=np.asarray(c.y), mode="lines",
                                 line=dict(color="#bbbbbb", width=1), name=c.label,
                                 legendgroup="others", showlegend=False,
                                 hovertemplate=f"{c.label}<br>step %{{x}}<br>{hover} %{{y:.4f}}"),
                      row=1, col=1)
    palette = qualitative.Plotly
    for i, c in enumerate(data.curves):
        color = palette[i % len(palette)]
        best = f"  best {c.best:.4g}" if c.best is not None else ""
        fig.add_trace(go.Scatter(
            x=np.asarray(c.x), y=np.asarray(c.y), mode="lines+markers" if len(c.x) <= 60 else "lines",
            line=dict(color=color, dash=DASHES.get(c.state, "dot")), marker=dict(size=4),
            name=c.label + best, legendgroup=f"run{c.run_id}",
            hovertemplate=f"{c.label}<br>step %{{x}}<br>{hover} %{{y:.4f}}<extra></extra>"),
            row=1, col=1)
        if c.state == "pruned" and c.x:
            fig.add_trace(go.Scatter(x=[c.x[-1]], y=[c.y[-1]], mode="markers", showlegend=False,
                                     marker=dict(symbol="x", size=12, color=color),
                                     legendgroup=f"run{c.run_id}", hoverinfo="skip"), row=1, col=1)
    fig.update_xaxes(title_text="step", row=1, col=1)
    fig.update_yaxes(title_text=data.info.curve_label, row=1, col=1)
    if not data.curves:
        _note(fig, "no run has validation results yet", 1)


def add_bests(fig: go.Figure, data: ComparisonData) -> None:
    fig.update_yaxes(title_text=data.info.bests_label, row=1, col=4)
    fig.update_xaxes(title_text="trial" if data.trials and data.trials[0].label.startswith("t")
                     else "run", type="category", row=1, col=4)
    for state in [s for s in STATES if any(t.state == s for t in data.trials)] + sorted(
            {t.state for t in data.trials} - set(STATES)):
        ts = [t for t in data.trials if t.state == state]
        fig.add_trace(go.Bar(x=[t.label for t in ts], y=[t.best for t in ts], name=state,
                             legendgroup=f"state-{state}", marker_color=state_style(state).color,
                             hovertemplate="%{x}<br>" + data.info.bests_label + " %{y:.4g}<extra>" + state
                             + "</extra>"),
                      row=1, col=4)
    values = [t.best for t in data.trials if t.best]
    if values and max(values) / min(values) > 20:
        fig.update_yaxes(type="log", row=1, col=4)
    if not values:
        _note(fig, "no run has validation results yet", 2)


def add_param(fig: go.Figure, p: ParamPoints, row: int, col: int, objective: str = OBJECTIVE) -> None:
    for state in dict.fromkeys(p.states):
        idx = [i for i, s in enumerate(p.states) if s == state]
        st = state_style(state)
        fig.add_trace(go.Scatter(
            x=[p.values[i] for i in idx], y=[p.objective[i] for i in idx], mode="markers",
            marker=dict(symbol=st.symbol, color=st.color, size=9, line=dict(width=0.5)),
            name=state, legendgroup=f"state-{state}", showlegend=False,
            text=[f"run {p.run_ids[i]}" for i in idx],
            hovertemplate=f"%{{text}} ({state})<br>{p.name} %{{x}}<br>%{{y:.4f}}<extra></extra>"),
            row=row, col=col)
    fig.update_xaxes(title_text=p.name, type="log" if p.log_x else ("category" if p.categorical else None),
                     row=row, col=col)
    fig.update_yaxes(title_text=objective if col == 1 else None, row=row, col=col)


def _note(fig: go.Figure, text: str, index: int) -> None:
    ref = "" if index == 1 else str(index)
    fig.add_annotation(text=text, xref=f"x{ref} domain", yref=f"y{ref} domain", x=0.5, y=0.5,
                       showarrow=False, font=dict(color=NOTE_COLOR, size=14))

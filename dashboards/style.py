"""The look every picture shares: colours, the styles of run states and events, sizes.

One place, so that a run's PNG and its HTML page, and a comparison's, show the same thing in
the same colour. Colours are matplotlib's tab10 palette written as hex codes, which matplotlib
and plotly both read; each renderer maps these to its library's own options (line widths,
marker sizes and layout stay with the renderer that uses them).
"""
from __future__ import annotations

from typing import NamedTuple

BLUE, ORANGE, GREEN, RED = "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"
PURPLE, BROWN, GREY, CYAN = "#9467bd", "#8c564b", "#7f7f7f", "#17becf"
NOTE_COLOR = "dimgray"        # notes on a panel: missing data, dropped points

DPI = 150                     # every PNG
FIGURE_WIDTH_IN = 18          # inches: 2700 pixels at 150 dpi

# The run dashboard: one colour per series role (see dashboards.run_records.Series.role).
ROLE_COLORS = {
    "train_step": BLUE, "train_smooth": BLUE, "train_epoch": "navy", "val": ORANGE,
    "lr": GREEN, "grad": PURPLE, "clip": RED, "epoch_seconds": CYAN,
    "mem_allocated": BLUE, "mem_reserved": ORANGE, "mem_peak": RED, "mem_process": BROWN,
    "gpu_util": GREEN, "val_bpb": PURPLE, "val_word_ppl": BROWN,
}


class EventStyle(NamedTuple):
    """A vertical line at an event's step."""
    color: str
    mpl_dash: str             # matplotlib linestyle
    plotly_dash: str          # plotly line dash
    label: str | None         # legend entry; None: the event's kind


EVENTS = {
    "resume": EventStyle(GREEN, ":", "dot", "resume"),
    "oom": EventStyle(RED, "--", "dash", "out of memory"),
    "nonfinite": EventStyle("magenta", "-.", "dashdot", "non-finite loss/grad"),
    "best": EventStyle("goldenrod", "-", "solid", "best checkpoint"),
    "early_stop": EventStyle(BROWN, "-", "solid", "early stop"),
    "gradient_checkpointing": EventStyle(RED, "-.", "dashdot", "out of memory: gradient checkpointing on"),
}
OTHER_EVENT = EventStyle("gray", ":", "dot", None)


def event_style(kind: str) -> EventStyle:
    style = EVENTS.get(kind, OTHER_EVENT)
    return style if style.label else style._replace(label=kind)


class StateStyle(NamedTuple):
    """How a run in this state is marked, in every comparison panel."""
    color: str
    marker: str               # matplotlib marker
    symbol: str               # plotly marker symbol


STATES = {
    "completed": StateStyle(BLUE, "o", "circle"),
    "pruned": StateStyle(ORANGE, "X", "x"),
    "failed": StateStyle(RED, "v", "triangle-down"),
    "running": StateStyle(GREEN, "^", "triangle-up"),
    "interrupted": StateStyle(GREY, "s", "square"),
}
OTHER_STATE = StateStyle(GREY, "D", "diamond")
PARAM_COLS = 4                # comparison: hyperparameter panels per row


def state_style(state: str) -> StateStyle:
    return STATES.get(state, OTHER_STATE)

"""The plain records a run dashboard is drawn from (NamedTuples of tuples, comparable by ==).

Builders (``dashboards.run_data``) decide everything about the data: what is drawn, which notes
a panel shows, how long series are reduced. Renderers (``run_png`` for PNG, ``run_html`` for
HTML) only map roles to styles (``dashboards.style``).
"""
from __future__ import annotations

from typing import NamedTuple


class Series(NamedTuple):
    role: str                    # what it is; the renderer maps it to a style (line, points, bars...)
    label: str                   # legend entry
    x: tuple[float, ...]
    y: tuple[float, ...]         # role "clip": one value, drawn as a horizontal line


class SecondAxis(NamedTuple):
    """Series read against a y axis of their own on the panel's right (utilisation beside memory,
    bits per byte beside the loss, perplexity per word beside perplexity per token)."""
    label: str                   # that axis's label
    series: tuple[Series, ...]
    limits: tuple[float, float]  # fixed: a percentage reads against 0-100 whatever the data
    log: bool = False            # a log scale (limits in data units all the same)


class Panel(NamedTuple):
    title: str
    xlabel: str
    ylabel: str
    series: tuple[Series, ...] = ()
    notes: tuple[str, ...] = ()  # shown on the panel: missing data, dropped points
    log_y: bool = False
    by_step: bool = True         # x is the optimizer step, so event markers belong on it
    from_zero: bool = False      # y axis starts at 0 (sizes such as memory read against zero)
    second_axis: SecondAxis | None = None

    @property
    def has_data(self) -> bool:
        return any(s.y for s in self.series if s.role != "clip")


class Marker(NamedTuple):
    kind: str                    # resume, oom, gradient_checkpointing, nonfinite, early_stop or best
    step: float


class Title(NamedTuple):
    run_id: int
    name: str
    status: str
    study: str | None
    trial: int | None
    hparams: tuple[tuple[str, str], ...]
    results: tuple[tuple[str, str], ...] = ()   # the best validation: loss, bits per byte, word perplexity

    @property
    def text(self) -> str:
        """Two lines: who the run is and how well it did, then its key hyperparameters."""
        line = f"{self.name}  \u00b7  run {self.run_id}  \u00b7  {self.status}"
        if self.study:
            line += f"  \u00b7  study {self.study}"
            line += f", trial {self.trial}" if self.trial is not None else ""
        if self.results:
            line += "  \u00b7  " + ", ".join(f"{k} {v}" for k, v in self.results)
        params = "   ".join(f"{k} {v}" for k, v in self.hparams)
        return f"{line}\n{params}" if params else line


class RunDashboardData(NamedTuple):
    title: Title
    loss: Panel
    perplexity: Panel
    lr: Panel
    grad_norm: Panel
    epoch_time: Panel
    memory: Panel
    markers: tuple[Marker, ...]

    @property
    def panels(self) -> tuple[Panel, ...]:
        return (self.loss, self.perplexity, self.lr, self.grad_norm, self.epoch_time, self.memory)

    @property
    def validation(self) -> Series | None:
        return next((s for s in self.loss.series if s.role == "val"), None)

    @property
    def validation_bpb(self) -> Series | None:
        """Bits per byte, on the loss panel's second axis (None for a run without them)."""
        axis = self.loss.second_axis
        return next((s for s in axis.series if s.role == "val_bpb"), None) if axis else None

"""Dashboards: render time of a long run's dashboard against plotting every raw point.

    python -m bench dashboards                  # part of the benchmark suite (docs/benchmarks.md)

A synthetic run of 100,000 and of 1,000,000 steps is written once through expdb's recorder
(``bench.synthetic``: per-step metrics, an evaluation every 1,000 steps, four epochs). Then,
alternating:
- ours: ``dashboards.fetch_run_data`` (read through expdb + build the records, which thin each
  step series to a bounded number of points) and ``dashboards.render_run_dashboard`` (the
  six-panel PNG), timed apart and together; and the same records rendered as the HTML page;
- naive: every step row read with ``db.steps`` and every point drawn with matplotlib
  (loss, perplexity, learning rate, gradient norm), saved as a PNG of the same size and dpi.
HTML: the size of our plotly page against a plotly figure of every raw point with plotly.js
inline, as ``fig.write_html`` writes it by default.
"""
from __future__ import annotations

import io
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bench.common import alternate, part, ratio, row, timed
from bench.synthetic import write_synthetic_run

PANELS = ("loss", "perplexity", "lr", "grad_norm")


@dataclass(frozen=True)
class Sizes:
    runs: tuple[int, ...] = (100_000, 1_000_000)
    eval_every: int = 1000
    epochs: int = 4


FULL = Sizes()
SMOKE = Sizes(runs=(2_000,), eval_every=100)


def write_run(db: Any, n_steps: int, sizes: Sizes) -> int:
    """A training-like run through the public recorder API; returns its id."""
    return write_synthetic_run(db, n_steps, name=f"synthetic-{n_steps}", eval_every=sizes.eval_every,
                               steps_per_epoch=n_steps // sizes.epochs, gpu=False)


# -- ours -------------------------------------------------------------------------------
def ours_read(db: Any, run_id: int):
    from dashboards import fetch_run_data
    return fetch_run_data(db, run_id)


def ours_render(data) -> bytes:
    from dashboards import render_run_dashboard
    buf = io.BytesIO()
    render_run_dashboard(data, buf)
    return buf.getvalue()


def ours_html(db: Any, run_id: int, work: Path) -> None:
    """Read, build and write our run page (plotly.js in a file beside it)."""
    import dashboards
    dashboards.render_run(ours_read(db, run_id), work / "ours.html", plotlyjs="directory")


def ours_html_bytes(db: Any, run_id: int, work: Path) -> tuple[int, int]:
    """Sizes of our run page: alone (plotly.js in a file beside it) and with plotly.js inline."""
    import dashboards
    data = ours_read(db, run_id)
    dashboards.render_run(data, work / "ours.html", plotlyjs="directory")
    dashboards.render_run(data, work / "inline" / "ours.html", plotlyjs="inline")
    return (work / "ours.html").stat().st_size, (work / "inline" / "ours.html").stat().st_size


# -- naive ------------------------------------------------------------------------------
def naive_png(db: Any, run_id: int) -> bytes:
    """Every step row, every point, one panel per metric; the dashboard's figure size and dpi."""
    from matplotlib.figure import Figure

    from dashboards.run_png import FIGSIZE
    from dashboards.style import DPI

    steps = db.steps(run_id)
    evals = db.evals(run_id)
    fig = Figure(figsize=FIGSIZE, layout="constrained")
    axes = fig.subplots(2, 2).flat
    x = steps["step"].to_numpy()
    series = {"loss": steps["loss"], "perplexity": np.exp(steps["loss"]), "lr": steps["lr"],
              "grad_norm": steps["grad_norm"]}
    for ax, name in zip(axes, PANELS):
        ax.plot(x, series[name], lw=0.8)
        if name == "loss":
            ax.plot(evals["step"], evals["val_loss"], marker="o", ms=3)
        ax.set_title(name)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def naive_html_bytes(db: Any, run_id: int) -> int:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    steps = db.steps(run_id)
    fig = make_subplots(rows=2, cols=2, subplot_titles=PANELS)
    x = steps["step"].tolist()
    values = {"loss": steps["loss"], "perplexity": np.exp(steps["loss"]), "lr": steps["lr"],
              "grad_norm": steps["grad_norm"]}
    for i, name in enumerate(PANELS):
        fig.add_trace(go.Scatter(x=x, y=values[name].tolist(), name=name), row=i // 2 + 1, col=i % 2 + 1)
    return len(fig.to_html(include_plotlyjs=True, full_html=True).encode("utf-8"))


def run(repeats: int, smoke: bool, log: Callable[[str], None] = print) -> dict[str, Any]:
    import expdb

    sizes = SMOKE if smoke else FULL
    work = Path(tempfile.mkdtemp(prefix="bench-dash-"))
    (work / "inline").mkdir()
    rows, ratios = [], []
    try:
        db = expdb.open(work / "runs.db")
        for n in sizes.runs:
            start = time.perf_counter()
            run_id = write_run(db, n, sizes)
            log(f"dashboards: wrote a {n:,}-step run in {time.perf_counter() - start:.1f} s (not timed)")
            read_s: list[float] = []

            def ours() -> float:
                t0 = time.perf_counter()
                data = ours_read(db, run_id)
                t1 = time.perf_counter()
                ours_render(data)
                read_s.append(t1 - t0)
                return time.perf_counter() - t0

            ours_render(ours_read(db, run_id))           # fonts and imports, not timed
            ours_html(db, run_id, work)                  # plotly and plotly.min.js, not timed
            times = alternate({"ours": ours, "naive": lambda: timed(lambda: naive_png(db, run_id)),
                               "ours_html": lambda: timed(lambda: ours_html(db, run_id, work))}, repeats, log)
            label = f"{n:,} steps"
            render_s = [total - read for total, read in zip(times["ours"], read_s)]
            rows += [row(f"{label}: ours, read + build + render PNG", times["ours"], "s", higher_is_better=False),
                     row(f"{label}: ours, read + build", read_s, "s", higher_is_better=False),
                     row(f"{label}: ours, render PNG", render_s, "s", higher_is_better=False),
                     row(f"{label}: ours, read + build + render HTML", times["ours_html"], "s",
                         higher_is_better=False),
                     row(f"{label}: naive matplotlib, every point", times["naive"], "s", higher_is_better=False)]
            ratios.append(ratio(f"{label}: naive / ours (PNG, end to end)", times["naive"], times["ours"]))
            page, inline = ours_html_bytes(db, run_id, work)
            naive_html = naive_html_bytes(db, run_id)
            rows += [row(f"{label}: ours, HTML page (plotly.js in a file beside it)", [page / 1e6], "MB",
                         higher_is_better=False),
                     row(f"{label}: ours, HTML page, plotly.js inline", [inline / 1e6], "MB",
                         higher_is_better=False)]
            ratios.append(ratio(f"{label}: naive / ours (HTML size, plotly.js inline in both)",
                                [naive_html], [inline]))
            rows.append(row(f"{label}: naive plotly HTML, every point, plotly.js inline", [naive_html / 1e6],
                            "MB", higher_is_better=False))
        db.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return part("Dashboards", settings={**asdict(sizes), "runs": list(sizes.runs)},
                method=("each run written once through the recorder; then ours and naive alternate; times are "
                        "wall seconds with imports and font caches warmed first"),
                rows=rows, ratios=ratios, repeats=repeats, smoke=smoke)

"""Training dashboards drawn from the experiment database (expdb) alone.

Each picture is built first as plain records (NamedTuples) from expdb reads, then rendered;
files are named by picture and output, and renderers import the records, never the reverse:
``run_data`` (records in ``run_records``, title and markers in ``run_meta``) -> ``run_png`` /
``run_html`` for one run's six panels; ``compare_data`` -> ``compare_png`` / ``compare_html``
for runs and studies side by side; ``report_data`` -> ``report_html`` for a study's Optuna
report; ``tables`` for CSV/JSON; ``style`` holds the colours and sizes every renderer shares;
``live`` and ``notebook`` re-render while a run trains. This module is the front door (the
functions below pick the renderer by the output's suffix); ``python -m dashboards`` is the CLI.

plotly and optuna are imported only by the functions that need them.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Any, Sequence

from dashboards.compare_data import ComparisonData, build_comparison, fetch_comparison
from dashboards.compare_png import render_comparison_png
from dashboards.run_data import build_run_data, fetch_run_data
from dashboards.run_png import build_figure, render_run_dashboard
from dashboards.run_records import RunDashboardData
from dashboards.series import reduce_minmax

__all__ = ["ComparisonData", "RunDashboardData", "build_comparison", "build_figure",
           "build_run_data", "fetch_comparison", "fetch_run_data", "reduce_minmax",
           "render_comparison", "render_run", "render_run_dashboard", "write_comparison",
           "write_run_dashboard", "write_study_report", "write_table"]

RUN_FORMATS = (".png", ".html")


def render_run(data: RunDashboardData, out: str | os.PathLike, plotlyjs: str = "directory",
               refresh_s: float | None = None) -> Path:
    """Write a run's records as PNG or HTML, by the suffix of ``out`` (an HTML page reloads
    itself every ``refresh_s`` seconds when that is set)."""
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in RUN_FORMATS:
        raise ValueError(f"{out}: a run dashboard is a .png or .html file")
    if suffix == ".html":
        from dashboards.run_html import render_run_html

        render_run_html(data, out, plotlyjs, refresh_s)
    else:
        render_run_dashboard(data, out)
    return out


def render_comparison(data: ComparisonData, out: str | os.PathLike | IO[bytes],
                      fmt: str | None = None, plotlyjs: str = "directory") -> None:
    """Write PNG or HTML (``fmt``, else the suffix of ``out``; file objects default to PNG)."""
    fmt = fmt or (Path(out).suffix.lstrip(".").lower() if isinstance(out, (str, os.PathLike)) else "png")
    if fmt == "html":
        from dashboards.compare_html import render_comparison_html

        render_comparison_html(data, out, plotlyjs)
    elif fmt == "png":
        render_comparison_png(data, out)
    else:
        raise ValueError(f"format {fmt!r}: use png or html")


def write_run_dashboard(db: Any, run_id: int, out_path: str | os.PathLike,
                        plotlyjs: str = "directory") -> Path:
    """Render run ``run_id`` of the open expdb database ``db`` to ``out_path`` (.png or .html)."""
    out = Path(out_path)
    data = fetch_run_data(db, run_id)
    out.parent.mkdir(parents=True, exist_ok=True)
    return render_run(data, out, plotlyjs)


def write_comparison(db: Any, out_path: str | os.PathLike, run_ids: Sequence[int] | None = None,
                     study: str | None = None, top: int = 10, plotlyjs: str = "directory",
                     metric: str | None = None) -> Path:
    """Compare ``run_ids`` or the runs of ``study`` in a PNG or HTML file (by suffix), by
    ``metric`` (val_loss or val_bpb; None: val_bpb where the runs' tokenizers differ)."""
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    render_comparison(fetch_comparison(db, run_ids, study, top, metric=metric), out, plotlyjs=plotlyjs)
    return out


def write_study_report(db_url: str | os.PathLike, study_name: str, out: str | os.PathLike,
                       storage: str | None = None, plotlyjs: str = "directory") -> Path:
    """The HTML report of a study: Optuna's plots next to the table of trials and their runs.

    ``db_url``: the experiment database (path or URL); ``storage``: the Optuna storage URL,
    by default the same database. Raises ``dashboards.errors.ReportError`` for an unknown study.
    """
    from dashboards.report_data import fetch_report
    from dashboards.report_html import render_report
    from dashboards.source import open_existing

    with open_existing(db_url, "db_url") as db:
        data, study = fetch_report(db, study_name, storage or db.url)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    render_report(data, study, out, plotlyjs)
    return out


def write_table(db: Any, out: str | os.PathLike, run_id: int | None = None,
                study: str | None = None) -> Path:
    """A run's epoch and evaluation metrics, or a study's per-trial summary, as .csv or .json."""
    from dashboards.tables import write_metrics_table

    return write_metrics_table(db, out, run_id=run_id, study=study)

"""Training dashboards rendered from the experiment database (expdb).

``data`` builds plain records (NamedTuples) from expdb reads, ``training`` draws the six-panel
run dashboard, ``compare`` overlays validation curves; ``python -m dashboards`` is the CLI.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dashboards.compare import ComparisonData, Curve, build_comparison, render_comparison
from dashboards.data import RunDashboardData, build_run_data, fetch_run_data
from dashboards.series import reduce_minmax
from dashboards.training import build_figure, render_run_dashboard

__all__ = ["ComparisonData", "Curve", "RunDashboardData", "build_comparison", "build_figure",
           "build_run_data", "fetch_run_data", "reduce_minmax", "render_comparison",
           "render_run_dashboard", "write_run_dashboard"]


def write_run_dashboard(db: Any, run_id: int, out_path: str | os.PathLike) -> Path:
    """Render run ``run_id`` of the open expdb database ``db`` to a PNG at ``out_path``."""
    out = Path(out_path)
    data = fetch_run_data(db, run_id)
    out.parent.mkdir(parents=True, exist_ok=True)
    render_run_dashboard(data, out)
    return out

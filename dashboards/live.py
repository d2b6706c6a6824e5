"""Re-render a run's dashboard while it trains (``python -m dashboards --run ID --watch S``).

The database is read while the trainer writes it: SQLite runs in WAL mode, so a read sees the
last committed rows and never blocks the writer. Each render replaces the file atomically, so
an image viewer or browser that reloads it never sees half a file. The loop ends by itself once
the run is no longer ``running`` (after one last render of the finished run). An HTML page
written while the run trains reloads itself every SECONDS (a meta refresh), so a browser tab
follows the run; the final page does not.
"""
from __future__ import annotations

import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from dashboards import render_run
from dashboards.run_data import fetch_run_data
from dashboards.run_records import RunDashboardData


def watch(db: Any, run_id: int, out: str | os.PathLike, every: float,
          iterations: int | None = None, plotlyjs: str = "directory",
          log: Callable[[str], None] = print, sleep: Callable[[float], None] = time.sleep
          ) -> RunDashboardData:
    """Render run ``run_id`` to ``out`` every ``every`` seconds until it stops running.

    ``iterations`` bounds the number of renders (for tests and scripts). Returns the records
    of the last render. Ctrl-C (KeyboardInterrupt) propagates to the caller.
    """
    n = 0
    while True:
        data = fetch_run_data(db, run_id)       # the status is read first: a finished run's
        status = data.title.status              # rows are all there when it says so
        # an HTML page reloads itself while the run trains; the final one stays put
        render_run(data, Path(out), plotlyjs, every if status == "running" else None)
        n += 1
        if status != "running":
            log(f"run {run_id} is {status}: wrote the final dashboard to {out}")
            return data
        log(f"{datetime.now():%H:%M:%S} run {run_id} running, {progress(data)}: wrote {out}"
            f"{'' if iterations is not None and n >= iterations else f'; next in {every:g} s'}")
        if iterations is not None and n >= iterations:
            return data
        sleep(every)


def progress(data: RunDashboardData) -> str:
    """'step 1,200, val loss 3.21, 1.43 bits per byte' from the records (the last step drawn, the
    last validation; bits per byte where the run measured them)."""
    steps = next((s for s in data.loss.series if s.role == "train_step"), None)
    text = f"step {int(steps.x[-1]):,}" if steps and steps.x else "no step yet"
    val, bpb = data.validation, data.validation_bpb
    return text + (f", val loss {val.y[-1]:.4g}" if val else "") + (f", {bpb.y[-1]:.4g} bits per byte" if bpb else "")

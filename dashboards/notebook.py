"""The run dashboard inline in a Jupyter/Colab notebook, refreshed while the run trains.

    from dashboards.notebook import live_dashboard
    live_dashboard("experiments.db", run_id=3, every=10)

Runs in the cell until the run stops running, ``max_updates`` renders were shown, or the cell
is interrupted; the image is replaced in place (one output, not one per refresh). IPython is
imported only here, and only when called.
"""
from __future__ import annotations

import io
import os
import time
from typing import Any

from dashboards.run_data import fetch_run_data
from dashboards.run_png import render_run_dashboard
from dashboards.run_records import RunDashboardData

NO_IPYTHON = ("live_dashboard needs IPython (it is part of Jupyter and Colab); install it with "
              "`pip install ipython`, or use `python -m dashboards --run ID --watch SECONDS`")


def live_dashboard(db: Any, run_id: int, every: float = 10, max_updates: int | None = None
                   ) -> RunDashboardData | None:
    """Show run ``run_id``'s dashboard and refresh it every ``every`` seconds.

    ``db``: an open expdb database, or its path or URL. Returns the last records shown
    (None if interrupted before the first).
    """
    if every <= 0:
        raise ValueError(f"every={every}: use a positive number of seconds, e.g. every=10")
    try:
        from IPython.display import Image, display
    except ImportError as e:
        raise ImportError(NO_IPYTHON) from e
    db = _open(db)
    handle, data, shown = None, None, 0
    try:
        while max_updates is None or shown < max_updates:
            data = fetch_run_data(db, run_id)
            image = Image(data=_png(data), format="png", width=1350)   # half size: fits a cell
            if handle is None:
                handle = display(image, display_id=True)
            else:
                handle.update(image)
            shown += 1
            if data.title.status != "running":
                break
            if max_updates is None or shown < max_updates:
                time.sleep(every)
    except KeyboardInterrupt:         # the notebook's stop button: keep the last picture
        pass
    return data


def _open(db: Any) -> Any:
    if isinstance(db, (str, os.PathLike)):
        from dashboards.source import open_existing

        return open_existing(db, "db")
    return db


def _png(data: RunDashboardData) -> bytes:
    buf = io.BytesIO()
    render_run_dashboard(data, buf)
    return buf.getvalue()

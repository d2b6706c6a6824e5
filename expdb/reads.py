"""Fast reads of step histories: whole (``steps``) or reduced for plotting (``step_series``).

Both go through a bare DBAPI cursor: a million rows through SQLAlchemy result rows and
``pandas.read_sql`` cost about four times as much as fetching plain tuples.

``step_series`` reduces a run to at most ``max_points`` rows without reading all of its
steps. The steps are cut into equal buckets; in each, for every requested metric, the
step holding its minimum and the step holding its maximum are kept (so spikes stay
visible), plus the first step with a NaN. The rows of all kept steps are returned
whole, so every column holds its true value at every returned step and plots as is:
``ax.plot(df.step, df.loss)``. Long runs are reduced from ``step_rollups`` (a summary
per 64 steps, so a million-step run costs ~16,000 summary rows and one lookup per
kept step); short ones from their rows.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from operator import itemgetter
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
from sqlalchemy import Engine

from expdb.engine import translate_dbapi
from expdb.errors import InvalidValueError
from expdb.models import ROLLUP_BLOCK, ROLLUP_METRICS

STEP_COLUMNS = ("run_id", "step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s", "tokens_seen")
SERIES_COLUMNS = STEP_COLUMNS[2:]
_FLOATS = ("loss", "lr", "grad_norm", "tokens_per_s")
_IN_CHUNK = 500


@contextmanager
def raw_cursor(engine: Engine, where: str) -> Iterator:
    """A DBAPI cursor with '?' placeholders on every backend; driver errors become ours."""
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        yield _Cursor(cursor, engine.dialect.paramstyle)
    except engine.dialect.loaded_dbapi.Error as exc:
        raise translate_dbapi(exc, where) from exc
    finally:
        raw.close()


class _Cursor:
    def __init__(self, cursor, paramstyle: str):
        self._cursor, self._qmark = cursor, paramstyle in ("qmark", "numeric")

    def all(self, sql: str, params: Sequence = ()) -> list[tuple]:
        self._cursor.execute(sql if self._qmark else sql.replace("?", "%s"), tuple(params))
        return self._cursor.fetchall()


def steps_frame(engine: Engine, where: str, run_id: int) -> pd.DataFrame:
    """Every step row of a run, ordered by step (NaN and "not reported" both read as NaN)."""
    with raw_cursor(engine, where) as cur:
        rows = cur.all(f"SELECT {', '.join(STEP_COLUMNS)} FROM step_metrics WHERE run_id = ? ORDER BY step",
                       (run_id,))
    return _frame(rows, STEP_COLUMNS)


def step_series(engine: Engine, where: str, run_id: int, columns: Sequence[str], max_points: int) -> pd.DataFrame:
    columns = _check_series_args(columns, max_points)
    wanted = ("step", *columns)
    with raw_cursor(engine, where) as cur:
        lo, hi, count = cur.all("SELECT MIN(first_step), MAX(last_step), SUM(n_rows) FROM step_rollups "
                                "WHERE run_id = ?", (run_id,))[0]
        if not count or count <= max_points:
            rows = cur.all(f"SELECT {', '.join(wanted)} FROM step_metrics WHERE run_id = ? ORDER BY step",
                           (run_id,))
            return _frame(rows, wanted)
        metrics = [c for c in columns if c in ROLLUP_METRICS]
        ends = len(metrics) < len(columns) or not metrics     # columns without rollups: keep bucket ends
        per_bucket = 2 * len(metrics) + 1 + 2 * ends
        buckets = max(1, max_points // per_bucket)
        width = math.ceil((hi - lo + 1) / buckets)
        if width >= 2 * ROLLUP_BLOCK:       # from the summaries of 64 steps
            lo = lo // ROLLUP_BLOCK * ROLLUP_BLOCK
            width = math.ceil(math.ceil((hi - lo + 1) / buckets) / ROLLUP_BLOCK) * ROLLUP_BLOCK
            segments = cur.all(_segment_sql(metrics, rollups=True), (run_id,))
        else:                               # few enough rows to reduce directly
            segments = cur.all(_segment_sql(metrics, rollups=False), (run_id,))
        steps = sorted(_select_steps(segments, lo, width, len(metrics), ends))
        rows = []
        for i in range(0, len(steps), _IN_CHUNK):
            chunk = steps[i:i + _IN_CHUNK]
            rows += cur.all(f"SELECT {', '.join(wanted)} FROM step_metrics WHERE run_id = ? AND step IN "
                            f"({', '.join('?' * len(chunk))}) ORDER BY step", (run_id, *chunk))
    return _frame(rows, wanted)


def _check_series_args(columns: Sequence[str], max_points: int) -> tuple[str, ...]:
    columns = (columns,) if isinstance(columns, str) else tuple(columns)
    unknown = [c for c in columns if c not in SERIES_COLUMNS]
    if unknown or not columns:
        raise InvalidValueError(f"step_series columns {list(unknown or columns)} are not step metrics; "
                                f"choose from {', '.join(SERIES_COLUMNS)}")
    if int(max_points) < 2 * len(columns) + 3:
        raise InvalidValueError(f"max_points={max_points} is too small for {len(columns)} columns; "
                                f"pass at least {2 * len(columns) + 3}")
    return tuple(dict.fromkeys(columns))


def _segment_sql(metrics: list[str], rollups: bool) -> str:
    """Rows of (first_step, last_step, nan_step, then min, min_step, max, max_step per metric)."""
    if rollups:
        parts = [f"{m}_min, {m}_min_step, {m}_max, {m}_max_step" for m in metrics]
        head, table = "first_step, last_step, nan_step", "step_rollups"
    else:
        parts = [f"{m}, step, {m}, step" for m in metrics]
        head, table = "step, step, CASE WHEN nan_columns IS NOT NULL THEN step END", "step_metrics"
    order = "block" if rollups else "step"
    return f"SELECT {', '.join([head, *parts])} FROM {table} WHERE run_id = ? ORDER BY {order}"


def _select_steps(segments: list[tuple], lo: int, width: int, k: int, ends: bool) -> set[int]:
    """Merge the segments of each bucket; the steps of its extremes (and ends, NaN) are kept."""
    buckets: dict[int, list] = {}
    for seg in segments:
        b = (seg[0] - lo) // width
        cur = buckets.get(b)
        if cur is None:
            buckets[b] = list(seg)
            continue
        cur[1] = seg[1]                                     # segments come in step order
        if cur[2] is None:
            cur[2] = seg[2]
        for i in range(3, 3 + 4 * k, 4):      # strictly: on a tie the earlier step stays
            if seg[i] is not None and (cur[i] is None or seg[i] < cur[i]):
                cur[i], cur[i + 1] = seg[i], seg[i + 1]
            if seg[i + 2] is not None and (cur[i + 2] is None or seg[i + 2] > cur[i + 2]):
                cur[i + 2], cur[i + 3] = seg[i + 2], seg[i + 3]
    keep: set[int] = set()
    for cur in buckets.values():
        keep.update(cur[i] for i in range(4, 3 + 4 * k, 2) if cur[i] is not None)
        if cur[2] is not None:
            keep.add(cur[2])
        if ends:
            keep.update(cur[:2])
    return keep


def _frame(rows: list[tuple], columns: Sequence[str]) -> pd.DataFrame:
    """Column by column: numpy turns a list into an array far faster than pandas turns rows
    into a frame. An integer column with a NULL, and every metric column, become float64
    (NULL as NaN)."""
    data = {}
    for i, name in enumerate(columns):
        values = list(map(itemgetter(i), rows))
        try:
            data[name] = np.array(values, dtype=np.float64 if name in _FLOATS else np.int64)
        except TypeError:       # None in an integer column
            data[name] = np.array(values, dtype=np.float64)
    return pd.DataFrame(data, columns=list(columns))

"""step_rollups: a summary of every ROLLUP_BLOCK consecutive steps, kept with step_metrics.

A summary is a list in the column order of ``step_rollups``: run_id, block, n_rows,
first_step, last_step, nan_step, then for each metric of ROLLUP_METRICS its minimum,
the first step holding it, its maximum and the first step holding that. Non-finite
values: NaN is stored as NULL (so never a minimum or maximum; ``nan_step`` records the
first NaN), +inf and -inf are ordinary extremes.

The writer folds the rows it has just written into the summary of the block in
progress; a block it knows nothing about (its first, after a resume) or whose rows
were replaced is summarised again from the table. Everything happens inside the
caller's transaction, so the rollups never disagree with step_metrics.
"""
from __future__ import annotations

from itertools import groupby
from typing import Iterable, Iterator, Sequence

from sqlalchemy import Connection, text

from expdb._write.rows import STEP, STEP_INDEX, RowSpec
from expdb.models import ROLLUP_BLOCK, ROLLUP_COLUMNS, ROLLUP_METRICS

ROLLUP = RowSpec("step_rollups", ROLLUP_COLUMNS, key=("run_id", "block"))
_RUN, _STEP = STEP_INDEX["run_id"], STEP_INDEX["step"]
_METRIC_INDEX = tuple(STEP_INDEX[m] for m in ROLLUP_METRICS)
_NAN = STEP_INDEX["nan_columns"]
_N, _FIRST, _LAST, _NAN_STEP = 2, 3, 4, 5
_BLOCK_ROWS = text(f"SELECT {', '.join(STEP.columns)} FROM step_metrics "
                   "WHERE run_id = :run_id AND step >= :lo AND step < :hi ORDER BY step")


def summarize(run_id: int, block: int, rows: Sequence[tuple]) -> list:
    """The summary of ``rows`` (STEP tuples of one block, each step once, in step order)."""
    columns = list(zip(*rows))                  # transposed in C: one tuple per column
    steps, nan_marks = columns[_STEP], columns[_NAN]
    nan_step = None
    if nan_marks.count(None) != len(nan_marks):
        nan_step = min(s for s, mark in zip(steps, nan_marks) if mark is not None)
    out = [run_id, block, len(rows), min(steps), max(steps), nan_step]
    for i in _METRIC_INDEX:
        values, kept_steps = columns[i], steps
        if None in values:      # a metric not reported, or NaN: leave those rows out
            kept = [(v, s) for v, s in zip(values, steps) if v is not None]
            values, kept_steps = tuple(v for v, _ in kept), tuple(s for _, s in kept)
        if values:
            lo, hi = min(values), max(values)
            out += [lo, kept_steps[values.index(lo)], hi, kept_steps[values.index(hi)]]
        else:
            out += [None, None, None, None]
    return out


def combine(a: list, b: list) -> list:
    """The summary of two sets of rows of one block, ``b``'s steps all after ``a``'s."""
    out = a[:2] + [a[_N] + b[_N], min(a[_FIRST], b[_FIRST]), max(a[_LAST], b[_LAST]),
                   a[_NAN_STEP] if a[_NAN_STEP] is not None else b[_NAN_STEP]]
    for i in range(_NAN_STEP + 1, len(a), 4):
        low = a if b[i] is None or (a[i] is not None and a[i] <= b[i]) else b      # ties: the earlier
        high = a if b[i + 2] is None or (a[i + 2] is not None and a[i + 2] >= b[i + 2]) else b
        out += [low[i], low[i + 1], high[i + 2], high[i + 3]]
    return out


class RollupTracker:
    """The summary of the block in progress of one run, and the fold of each written batch."""

    def __init__(self, run_id: int):
        self.run_id = run_id
        self._open: list | None = None      # summary of the highest block written so far

    def forget(self) -> None:
        """Drop the in-memory summary (e.g. after a failed transaction)."""
        self._open = None

    def update(self, conn: Connection, rows: list[tuple], paramstyle: str) -> None:
        """Upsert the summaries of the blocks that ``rows`` (just written) touched."""
        summaries = [self._fold(conn, block, group) for block, group in _blocks(rows)]
        latest = {s[1]: tuple(s) for s in summaries}     # a block may recur: the last one is whole
        conn.exec_driver_sql(ROLLUP.sql(paramstyle), list(latest.values()))

    def _fold(self, conn: Connection, block: int, group: list[tuple]) -> list:
        steps = [r[_STEP] for r in group]
        fresh = len(set(steps)) == len(steps)       # no step twice in the batch
        if fresh and steps != sorted(steps):
            group.sort(key=lambda r: r[_STEP])
            steps.sort()
        open_ = self._open
        if open_ is not None and fresh and block > open_[1]:
            # Past every block this writer has written: only these rows can be in it (a resume
            # deleted everything after its step, and the run has one writer).
            summary = summarize(self.run_id, block, group)
        elif open_ is not None and fresh and block == open_[1] and min(steps) > open_[_LAST]:
            summary = combine(open_, summarize(self.run_id, block, group))
        else:       # first sight of the run's blocks, rows replaced or out of order: read it back
            summary = load_block(conn, self.run_id, block)
        if open_ is None or block >= open_[1]:
            self._open = summary
        return summary


def _blocks(rows: list[tuple]) -> Iterator[tuple[int, list[tuple]]]:
    """(block, its rows) for each run of consecutive rows in one block. Rows of consecutive
    steps (the usual batch) are cut by arithmetic; anything else by looking at every row."""
    steps = [r[_STEP] for r in rows]
    if steps and steps[-1] - steps[0] == len(steps) - 1 and steps == sorted(steps):
        start = 0
        while start < len(rows):
            block = steps[start] // ROLLUP_BLOCK
            end = min(len(rows), start + (block + 1) * ROLLUP_BLOCK - steps[start])
            yield block, rows[start:end]
            start = end
        return
    for block, group in groupby(rows, key=lambda r: r[_STEP] // ROLLUP_BLOCK):
        yield block, list(group)


def load_block(conn: Connection, run_id: int, block: int) -> list | None:
    rows = conn.execute(_BLOCK_ROWS, {"run_id": run_id, "lo": block * ROLLUP_BLOCK,
                                      "hi": (block + 1) * ROLLUP_BLOCK}).all()
    return summarize(run_id, block, [tuple(r) for r in rows]) if rows else None


def refresh_after(conn: Connection, run_id: int, step: int, paramstyle: str) -> None:
    """After a resume deleted the steps past ``step``: drop the later blocks and
    summarise the block holding ``step`` again."""
    block = step // ROLLUP_BLOCK if step >= 0 else -1
    conn.execute(text("DELETE FROM step_rollups WHERE run_id = :run_id AND block >= :block"),
                 {"run_id": run_id, "block": max(block, 0)})
    if block >= 0 and (summary := load_block(conn, run_id, block)) is not None:
        conn.exec_driver_sql(ROLLUP.sql(paramstyle), [tuple(summary)])


def rebuild(conn: Connection, run_ids: Iterable[int], paramstyle: str, chunk_blocks: int = 2048) -> None:
    """Summarise every step of ``run_ids`` again (upgrades, merges of old files, repairs)."""
    select_rows = text(f"SELECT {', '.join(STEP.columns)} FROM step_metrics "
                       "WHERE run_id = :run_id AND step >= :lo ORDER BY step LIMIT :n")
    for run_id in run_ids:
        conn.execute(text("DELETE FROM step_rollups WHERE run_id = :run_id"), {"run_id": run_id})
        lo = -2 ** 62
        while rows := [tuple(r) for r in conn.execute(select_rows, {"run_id": run_id, "lo": lo,
                                                                    "n": chunk_blocks * ROLLUP_BLOCK})]:
            full = len(rows) == chunk_blocks * ROLLUP_BLOCK
            last_block = rows[-1][_STEP] // ROLLUP_BLOCK
            if full:    # the last block may continue past this chunk: leave it to the next
                rows = [r for r in rows if r[_STEP] // ROLLUP_BLOCK < last_block] or rows
            summaries = [summarize(run_id, b, list(g))
                         for b, g in groupby(rows, key=lambda r: r[_STEP] // ROLLUP_BLOCK)]
            conn.exec_driver_sql(ROLLUP.sql(paramstyle), [tuple(s) for s in summaries])
            lo = rows[-1][_STEP] + 1

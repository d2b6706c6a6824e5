"""Numeric helpers for step series: read a column, drop non-finite points, smooth, thin out.

A 1,000,000-step run cannot be drawn point by point (nor should its records hold a million
floats), so step series are thinned with ``reduce_minmax``, which keeps each bucket's lowest
and highest value: a loss spike or a gradient-norm blow-up stays visible after reduction.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

MAX_POINTS = 2000  # points per drawn step series; ~1 per horizontal pixel of a panel


def column(df: pd.DataFrame | None, name: str) -> np.ndarray:
    """``df[name]`` as a float array (missing values as nan); empty if the frame or column is absent."""
    if df is None or name not in df.columns:
        return np.empty(0) if df is None else np.full(len(df), np.nan)
    values = pd.to_numeric(df[name], errors="coerce")
    return values.to_numpy(dtype=float, na_value=np.nan)


def finite_xy(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Points where both x and y are finite, sorted by x (stable), and how many were dropped.

    Dropped counts the rows with a finite x whose y is nan or infinite (a diverged loss); the
    database returns NaN both for a stored nan and for a missing value, so both count.
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    dropped = int(np.count_nonzero(np.isfinite(x) & ~np.isfinite(y)))
    order = np.argsort(x[keep], kind="stable")
    return x[keep][order], y[keep][order], dropped


def moving_average(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over ``window`` points (shorter at the start); same length as ``y``."""
    y = np.asarray(y, dtype=float)
    if window <= 1 or y.size == 0:
        return y.copy()
    csum = np.concatenate(([0.0], np.cumsum(y)))
    idx = np.arange(1, y.size + 1)
    start = np.maximum(idx - window, 0)
    return (csum[idx] - csum[start]) / (idx - start)


def smoothing_window(n: int) -> int:
    """About 1/50 of the run, between 1 and 500 steps."""
    return int(min(500, max(1, n // 50)))


def reduce_minmax(x: np.ndarray, y: np.ndarray, max_points: int = MAX_POINTS
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Thin (x, y) to at most ``max_points`` points, keeping every bucket's min and max.

    ``x`` must be sorted and ``y`` finite (see ``finite_xy``). The first and last points are
    always kept, so the x range is unchanged; the global min and max of y are always kept
    because each lies in some bucket. The output is a subsequence of the input, so x stays
    sorted.
    """
    if max_points < 4:
        raise ValueError(f"max_points={max_points}: use at least 4 (first, last, one min and max)")
    x, y = np.asarray(x), np.asarray(y, dtype=float)
    n = y.size
    if n <= max_points:
        return x, y
    inner = y[1:-1]
    size = -(-inner.size // ((max_points - 2) // 2))      # points per bucket (ceil division)
    n_buckets = -(-inner.size // size)                    # <= (max_points - 2) // 2
    pad = n_buckets * size - inner.size
    lo = np.concatenate((inner, np.full(pad, np.inf))).reshape(n_buckets, size)
    hi = np.concatenate((inner, np.full(pad, -np.inf))).reshape(n_buckets, size)
    offsets = np.arange(n_buckets) * size + 1            # +1: inner starts at index 1
    keep = np.concatenate(([0], lo.argmin(axis=1) + offsets, hi.argmax(axis=1) + offsets, [n - 1]))
    keep = np.unique(keep)                                # sorted, so x stays monotonic
    return x[keep], y[keep]

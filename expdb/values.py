"""Conversions between what the trainer hands us and what a row holds.

Kept apart from the tables so the writer, the recorder and the reads share one
definition of the JSON text format (the NaN convention of metric rows is in expdb._write.rows).
"""
from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from typing import Any, Mapping


def utcnow() -> datetime:
    """Naive UTC: SQLite has no time zones, so both backends store UTC without one."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def to_json(value: Mapping[str, Any] | None) -> str:
    # default=str: a Path or a numpy scalar in a config must not lose the run.
    # NaN and Infinity are written as Python's json does; json.loads reads them back.
    return json.dumps(dict(value or {}), default=str)


def from_json(text: str | None) -> dict[str, Any]:
    return json.loads(text) if text else {}


def as_int(value: Any) -> int | None:
    return None if value is None else int(value)


def jsonable(value: Any) -> Any:
    """A value for strict JSON: non-finite floats become "nan", "inf", "-inf"; times ISO 8601."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, datetime):
        return None if value != value else value.isoformat()     # pandas' NaT != NaT
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item"):          # numpy scalars from a DataFrame
        return jsonable(value.item())
    return value

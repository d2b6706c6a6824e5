"""Files that appear whole or not at all, and JSON that survives non-finite floats.

A leaf module: it imports nothing from this project, so every package (trainer, expdb,
studies, dashboards) may use it. Anything the project writes for a reader to find later
goes through ``atomic_write_*``: the data lands in a temporary file beside the target,
then ``os.replace`` swaps it in, so a reader (or the next Kaggle session after a kill)
sees the old file or the new one, never half of one.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

TMP_PREFIX = ".tmp-"   # temporary files and folders start with this; scanners skip them


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside ``path`` survive a power cut (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, payload: bytes, durable: bool = False) -> Path:
    """Replace ``path`` by ``payload``; ``durable`` also fsyncs the file and its folder."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TMP_PREFIX}{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o644)    # mkstemp makes 0600; the file is meant to be shared like any other
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, durable: bool = False) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), durable)


def atomic_write_json(path: str | os.PathLike, obj: Any, durable: bool = False, indent: int | None = 1) -> Path:
    """``obj`` as strict JSON (non-finite floats become strings, see ``json_safe``)."""
    text = json.dumps(json_safe(obj), indent=indent, sort_keys=True, allow_nan=False)
    return atomic_write_text(path, text, durable)


def json_float(x: float) -> float | str:
    """A float for strict JSON: itself when finite, else "inf", "-inf" or "nan"."""
    return x if math.isfinite(x) else str(x)


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by ``json_float``'s string, recursively."""
    if isinstance(obj, float):
        return json_float(obj)
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def finite_or_none(value: Any) -> float | None:
    """A number as a finite float, or None (None, NaN, inf, or not a number)."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None

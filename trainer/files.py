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
import re
import shutil
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


def as_os_error(exc: BaseException) -> OSError | None:
    """``exc`` as the operating system's error it reports, or None for any other error.

    safetensors raises its own SafetensorError for a failed write ("I/O error: No space left
    on device (os error 28)"), not an OSError, so a full disk would pass for a bug.
    """
    if isinstance(exc, OSError):
        return exc
    found = re.search(r"os error (\d+)", str(exc))
    if found is None:
        return None
    errno = int(found[1])
    return OSError(errno, os.strerror(errno))


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free space on the filesystem holding ``path`` (its nearest existing parent), if it can be read."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


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


# -- kill tests: a named point where a test may SIGKILL the process -------------------------
PAUSE_AT_ENV = "TRAINER_PAUSE_AT"       # the point's name, e.g. "merge.copied"
PAUSE_DIR_ENV = "TRAINER_PAUSE_DIR"     # where ``<name>.paused`` appears (default: the working folder)


def pid_alive(pid: int) -> bool:
    """Whether a process of this machine with ``pid`` still runs (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def pause_point(name: str, seconds: float = 300.0) -> None:
    """When ``TRAINER_PAUSE_AT`` names this point: write ``<name>.paused`` and sleep, so that a
    test can kill the process exactly here (it waits for the file, never for a time). Only
    at rare points (a merge, a pack, a clean-up), never in a training step."""
    if os.environ.get(PAUSE_AT_ENV) != name:
        return
    import time

    Path(os.environ.get(PAUSE_DIR_ENV, "."), f"{name}.paused").write_text(str(os.getpid()))
    time.sleep(seconds)

"""Opening the experiment database for reading: an existing one only, never created.

Not with ``readonly=True``: on SQLite, expdb's read-only mode opens a file that has no -wal
file at that moment as immutable, and an immutable reader never sees rows committed later,
so a dashboard watching a run that starts (or resumes) after it opened would stay frozen.
A plain open reads in WAL mode alongside the writer; expdb itself falls back to read-only
for a file in a place this process cannot write.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dashboards.errors import UsageError


def open_existing(url_or_path: str | os.PathLike, flag: str = "--db") -> Any:
    """An existing expdb database; UsageError (naming ``flag``) for a missing or refused one."""
    import expdb
    from expdb.errors import ExpdbError

    url = str(url_or_path)
    if "://" not in url and not Path(url).is_file():
        raise UsageError(f"{flag} {url}: no such file; pass the path of an experiment database "
                         "written by the trainer (python -m trainer ...), or a SQLAlchemy URL")
    try:
        return expdb.open(url, create=False)
    except ExpdbError as e:
        raise UsageError(f"{flag} {url}: {e}") from e

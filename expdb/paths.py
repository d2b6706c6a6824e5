"""Portable paths: checkpoint and run folders stored relative to the database's own folder.

A study's working folder holds its database and its runs (``experiments.db``, ``runs/``),
so a path inside that folder is stored relative to it ("runs/t/trial-0001/checkpoints/
step-0000040") and resolved against wherever the database file is now: a folder moved to
another absolute path, or a session pack, still finds its files. A path outside the
folder, or any path of a database on a server, is stored absolute, as before; old
databases with absolute paths keep working, as an absolute path resolves to itself.
"""
from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy.engine import make_url


def root_of(url: str) -> Path | None:
    """The folder relative paths of this database start from: a SQLite file's directory, else None."""
    parsed = make_url(str(url))
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    database = parsed.database[len("file:"):] if parsed.database.startswith("file:") else parsed.database
    return Path(database.split("?")[0]).expanduser().absolute().parent


def portable(path: str | os.PathLike, root: Path | None) -> str:
    """What to store for ``path`` (relative to the current directory, or absolute)."""
    absolute = Path(os.path.abspath(Path(path).expanduser()))
    if root is None:
        return str(absolute)
    try:
        return absolute.relative_to(Path(os.path.abspath(root))).as_posix()
    except ValueError:      # outside the database's folder: absolute, as it is
        return str(absolute)


def resolve(stored: str | None, root: Path | None) -> Path | None:
    """The file a stored path names now."""
    if stored is None:
        return None
    p = Path(stored).expanduser()
    if p.is_absolute() or root is None:
        return p
    return root / p


def rebase(stored: str | None, old_root: Path | None, new_root: Path | None) -> str | None:
    """A path stored against ``old_root``, stored again against ``new_root`` (a merge)."""
    if stored is None:
        return None
    return portable(resolve(stored, old_root), new_root)

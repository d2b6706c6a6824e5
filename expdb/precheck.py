"""Checking a database before anything is written: the command lines refuse a bad --db at once.

``check_database`` raises the ExpdbError that opening (and, for a writer, writing) the
database would raise later, but only reads: it creates no file or directory, no schema,
no -wal or -shm file, and upgrades nothing. A training run or a study calls it before it
prepares its data, so a text file passed as --db costs no token cache and no traceback.
"""
from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import inspect, make_url, text

from expdb import migrations
from expdb.engine import DEFAULT_BUSY_TIMEOUT_S, locate, make_engines, normalize_url, translated
from expdb.errors import ExpdbError, ReadOnlyDatabaseError, SchemaError
from expdb.models import SCHEMA_VERSION, Base
from expdb.schema import _refuse_newer as refuse_newer
from expdb.schema import read_version
from expdb.views import VIEWS


# Optuna's RDB storage (optuna/storages/_rdb/models.py): a study keeps its storage in the
# experiment database's file by design, so these tables beside ours, or alone, are no stranger's.
OPTUNA_TABLES = frozenset({
    "studies", "study_directions", "study_user_attributes", "study_system_attributes", "trials",
    "trial_params", "trial_values", "trial_intermediate_values", "trial_user_attributes",
    "trial_system_attributes", "trial_heartbeats", "version_info", "alembic_version"})


def check_database(url_or_path: str | os.PathLike, *, create: bool, write: bool, shared: bool = False) -> None:
    """Raise what opening ``url_or_path`` would raise; read only.

    ``create``: a SQLite path that does not exist yet is fine (it will be created), if its
    directory can be made. ``write``: the caller will record into it (a trainer, a study),
    so a read-only file is refused too; readers accept one. A writer is also refused a
    database that holds another program's tables and none of ours, unless ``shared`` (the
    user's --db-shared) says to add ours beside them.
    """
    url = normalize_url(url_or_path)
    if make_url(url).get_backend_name() == "sqlite" and _is_new_path(url):
        if not create:
            locate(url, create=False, readonly=True)   # raises its "no experiment database" error
        _check_creatable(Path(make_url(url).database))
        return
    location = locate(url, create=False, readonly=True)   # a directory, or not a SQLite file: raises
    found, tables = _read_schema(location)
    _check_version(found, tables, location.where, create=create)
    if write and not shared and found is None:
        _refuse_strangers(tables, location.where)
    if write and location.sqlite and not _writable(Path(location.where)):
        raise ReadOnlyDatabaseError(f"{location.where} is not writable (a read-only file system, or no write "
                                    "permission); nothing was written. Pass a path in a writable directory")


def check_storage_file(url: str) -> None:
    """An Optuna storage URL: a SQLite file must be a SQLite file, or not exist yet; a server
    must answer one connection (read only: Optuna creates its tables later)."""
    if "://" not in url:
        raise ExpdbError("not a URL; pass a SQLAlchemy URL such as sqlite:///study.db")
    if make_url(url).get_backend_name() != "sqlite":
        _check_server(url)
    elif _is_new_path(url):
        _check_creatable(Path(make_url(url).database))
    else:
        locate(url, create=False, readonly=True)


def _check_server(url: str) -> None:
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    shown = make_url(url).render_as_string(hide_password=True)
    try:
        # A host that drops packets would hold the check for minutes of TCP retries.
        timeout = {"connect_timeout": 10} if make_url(url).get_backend_name() == "postgresql" else {}
        engine = create_engine(url, poolclass=NullPool, connect_args=timeout)
    except (ImportError, ValueError) as exc:      # no driver for the dialect, or a malformed URL
        raise ExpdbError(f"cannot use this URL ({exc}); for PostgreSQL pass postgresql+psycopg://USER@HOST/DB "
                         "(psycopg is installed with this package)") from exc
    try:
        with translated(shown), engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except ExpdbError as exc:
        raise ExpdbError(f"{exc}; check that the server is running and the URL (host, port, user, "
                         "database) is right") from exc
    finally:
        engine.dispose()


def study_names(url: str) -> list[str]:
    """The Optuna studies kept at ``url`` (an existing database), read without Optuna: opening
    an Optuna storage creates its tables, a write that a report must not make."""
    location = locate(normalize_url(url), create=False, readonly=True)
    reader, _ = make_engines(location, DEFAULT_BUSY_TIMEOUT_S)
    try:
        with translated(location.where), reader.connect() as conn:
            if not inspect(conn).has_table("studies") or not inspect(conn).has_table("alembic_version"):
                return []
            return list(conn.execute(text("SELECT study_name FROM studies ORDER BY study_id")).scalars())
    finally:
        reader.dispose()


def _is_new_path(url: str) -> bool:
    database = make_url(url).database
    return bool(database) and database != ":memory:" and not database.startswith("file:") \
        and not Path(database).exists()


def _check_creatable(path: Path) -> None:
    """The nearest existing folder above ``path`` must be a writable directory."""
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ReadOnlyDatabaseError(f"cannot create the experiment database {path}: {parent} is a file, not a "
                                    "directory. Nothing was written. Pass a path in a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ReadOnlyDatabaseError(f"cannot create the experiment database {path}: {parent} is not writable. "
                                    "Nothing was written. Pass a path in a writable directory")


def _read_schema(location) -> tuple[int | None, set[str]]:
    reader, _ = make_engines(location, DEFAULT_BUSY_TIMEOUT_S)
    try:
        with translated(location.where), reader.connect() as conn:
            inspector = inspect(conn)
            return read_version(conn), set(inspector.get_table_names()) | set(inspector.get_view_names())
    finally:
        reader.dispose()


def _check_version(found: int | None, tables: set[str], where: str, create: bool) -> None:
    refuse_newer(found, where)
    if found is not None and any(v not in migrations.STEPS for v in range(found, SCHEMA_VERSION)):
        raise SchemaError(f"{where} has expdb schema version {found}, which this expdb cannot upgrade; open it "
                          "with the smallgpt-lab release that created it")
    if found is None:
        clash = sorted((set(Base.metadata.tables) | set(VIEWS)) & tables)
        if clash:   # another program's tables (mlflow also has "runs"): mixing schemas would corrupt both
            raise SchemaError(f"{where} holds tables that expdb did not create ({', '.join(clash)}): it is "
                              "another program's database; pass a separate file for the experiment database")
        if not create:
            raise SchemaError(f"{where} holds no experiment database (no expdb tables); pass the database "
                              "that python -m trainer or python -m studies.search wrote")


def _refuse_strangers(tables: set[str], where: str) -> None:
    """A database of tables that are neither expdb's nor Optuna's (and no expdb schema yet):
    another application's file, which recording into would change."""
    strangers = sorted(tables - set(Base.metadata.tables) - set(VIEWS) - OPTUNA_TABLES)
    if strangers:
        shown = ", ".join(strangers[:5]) + (f" and {len(strangers) - 5} more" if len(strangers) > 5 else "")
        raise SchemaError(f"{where} holds another program's tables ({shown}) and none of this project's; "
                          "nothing was written. Pass a new file for the experiment database (e.g. --db "
                          "experiments.db), or add --db-shared to keep this project's tables in that file too")


def _writable(path: Path) -> bool:
    return os.access(path, os.W_OK) and os.access(path.parent, os.W_OK | os.X_OK)

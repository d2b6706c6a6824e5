"""Engines, connections and sessions, with driver errors turned into expdb's own.

SQLite details live here: every connection gets ``busy_timeout`` and
``foreign_keys=ON`` (both are per connection, not per file), and expdb emits BEGIN
itself so that writes can take the write lock up front with ``BEGIN IMMEDIATE``.
A deferred transaction that reads and then writes can fail at once with
"database is locked" when another process wrote in between, without waiting for
the busy timeout; an immediate one waits.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from expdb.errors import (ConflictError, CorruptDatabaseError, DatabaseLockedError, DatabaseNotFoundError, ExpdbError,
                          NotADatabaseError, StorageError)

SQLITE_MAGIC = b"SQLite format 3\x00"
DEFAULT_BUSY_TIMEOUT_S = 30.0
# Execution option read by the "begin" hook: connections of a writer engine BEGIN IMMEDIATE.
_WRITE_OPTION = "expdb_write"


def normalize_url(url_or_path: str | os.PathLike) -> str:
    """A SQLAlchemy URL as is; anything else is a file path for SQLite."""
    text = os.fspath(url_or_path)
    if "://" in text:
        return text
    return "sqlite:///" + str(Path(text).expanduser().absolute())


def describe(url: str) -> str:
    """The path of a SQLite file, or the URL without its password, for messages."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return str(parsed.database)
    return parsed.render_as_string(hide_password=True)


def check_sqlite_file(url: str, create: bool) -> None:
    """Refuse, before any connection touches it, a path that is not a SQLite database."""
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        raise ExpdbError(f"{url!r}: expdb needs a SQLite file shared by its writer thread and "
                         "other processes, not an in-memory database; pass a file path")
    path = Path(database)
    if path.is_dir():
        raise NotADatabaseError(f"{path} is a directory, not an experiment database; "
                                f"pass a file path such as {path / 'experiments.db'}")
    if not path.exists():
        if not create:
            raise DatabaseNotFoundError(f"no experiment database at {path}; check the path "
                                        "(a training run creates it on its first start)")
        path.parent.mkdir(parents=True, exist_ok=True)
        return
    with path.open("rb") as fh:
        head = fh.read(len(SQLITE_MAGIC))
    if head and head != SQLITE_MAGIC:   # an empty file is a valid, empty SQLite database
        raise NotADatabaseError(
            f"{path} is not an experiment database: it is not a SQLite file (it starts with "
            f"{head!r}). The file was not modified. Pass the path of an experiment database, "
            "or a path that does not exist yet to create a new one.")


def make_engines(url: str, busy_timeout_s: float) -> tuple[Engine, Engine]:
    """(reader, writer): one pool; the writer's transactions take the write lock first."""
    if make_url(url).get_backend_name() == "sqlite":
        engine = create_engine(url)
        _install_sqlite_hooks(engine, busy_timeout_s)
    else:
        # pre_ping: a training run holds its engine for hours; servers drop idle connections.
        engine = create_engine(url, pool_pre_ping=True)
    return engine, engine.execution_options(**{_WRITE_OPTION: True})


def _install_sqlite_hooks(engine: Engine, busy_timeout_s: float) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None      # sqlite3 must not emit BEGIN: we do
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:
        write = conn.get_execution_options().get(_WRITE_OPTION, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def enable_wal(engine: Engine) -> None:
    """WAL lets readers (pandas, dashboards) read while a run writes. It is a property of
    the file, so it is set once; it cannot be changed inside a transaction, hence raw."""
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        mode = cursor.execute("PRAGMA journal_mode").fetchone()[0]
        if str(mode).lower() != "wal":
            cursor.execute("PRAGMA journal_mode = WAL")
        cursor.close()
    finally:
        raw.close()


def translate(exc: SQLAlchemyError, where: str = "the experiment database") -> ExpdbError:
    """The expdb error for a driver error."""
    detail = str(getattr(exc, "orig", None) or exc).strip()
    if isinstance(exc, IntegrityError):
        return ConflictError(f"{where}: the write broke a constraint ({detail})")
    if isinstance(exc, OperationalError) and ("locked" in detail or "busy" in detail):
        return DatabaseLockedError(f"{where} stayed locked by another connection past the busy "
                                   f"timeout ({detail}); the rows are kept and retried")
    if "malformed" in detail:
        return CorruptDatabaseError(f"{where} is damaged ({detail}); restore a copy, or salvage it "
                                    "with `sqlite3 OLD.db .recover | sqlite3 NEW.db`")
    if "file is not a database" in detail:
        return NotADatabaseError(f"{where} is not an experiment database ({detail}); pass the "
                                 "path of an experiment database or a new path")
    return StorageError(f"{where}: database error ({detail})")


@contextmanager
def translated(where: str = "the experiment database") -> Iterator[None]:
    try:
        yield
    except SQLAlchemyError as exc:
        raise translate(exc, where) from exc


@contextmanager
def session_scope(factory: sessionmaker, where: str = "the experiment database") -> Iterator[Session]:
    """Commit on success, roll back on any error, always close; driver errors become ours."""
    session = factory()
    try:
        yield session
        session.commit()
    except SQLAlchemyError as exc:
        session.rollback()
        raise translate(exc, where) from exc
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()

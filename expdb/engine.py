"""Engines, connections and sessions, with driver errors turned into expdb's own.

SQLite details live here: every connection gets ``busy_timeout``, ``foreign_keys=ON``
and ``synchronous=NORMAL`` (all per connection, not per file), and expdb emits BEGIN
itself so that writes can take the write lock up front with ``BEGIN IMMEDIATE``.
A deferred transaction that reads and then writes can fail at once with
"database is locked" when another process wrote in between, without waiting for
the busy timeout; an immediate one waits. ``synchronous=NORMAL`` is SQLite's advice for
WAL: a commit is not fsynced, so it survives a killed process (the operating system
has it) but not a power cut, which may take the last transactions, never the file.

A SQLite file in a place this process cannot write (a read-only mount such as Kaggle's
/kaggle/input, a directory or file without write permission) is opened read-only:
every read works, and every write raises ReadOnlyDatabaseError before touching it.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import quote

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from expdb.errors import (ConflictError, CorruptDatabaseError, DatabaseLockedError, DatabaseNotFoundError,
                          ExpdbError, NotADatabaseError, ReadOnlyDatabaseError, StorageError)

SQLITE_MAGIC = b"SQLite format 3\x00"
DEFAULT_BUSY_TIMEOUT_S = 30.0
# Execution option read by the "begin" hook: connections of a writer engine BEGIN IMMEDIATE.
_WRITE_OPTION = "expdb_write"


@dataclass(frozen=True)
class Location:
    """Where a database is: the URL given, the URL to connect with, and whether we may write."""

    url: str
    connect_url: str
    where: str              # for messages: the file path, or the URL without its password
    sqlite: bool
    readonly: bool = False


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


def locate(url_or_path: str | os.PathLike, create: bool, readonly: bool) -> Location:
    """Check a SQLite path before any connection can touch it; decide read-only access."""
    url = normalize_url(url_or_path)
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return Location(url, url, describe(url), sqlite=False, readonly=readonly)
    path = _sqlite_path(url)
    if not path.exists():
        if not create or readonly:
            raise DatabaseNotFoundError(f"no experiment database at {path}; check the path "
                                        "(a training run creates it on its first start)")
        _make_parent(path)
        return Location(url, url, str(path), sqlite=True)
    _check_sqlite_header(path)
    if readonly or not _writable(path):
        return Location(url, _readonly_url(path), str(path), sqlite=True, readonly=True)
    return Location(url, url, str(path), sqlite=True)


def _sqlite_path(url: str) -> Path:
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        raise ExpdbError(f"{url!r}: expdb needs a SQLite file shared by its writer thread and "
                         "other processes, not an in-memory database; pass a file path")
    path = Path(database)
    if path.is_dir():
        raise NotADatabaseError(f"{path} is a directory, not an experiment database; "
                                f"pass a file path such as {path / 'experiments.db'}")
    return path


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReadOnlyDatabaseError(
            f"cannot create the experiment database {path}: its directory cannot be made "
            f"({exc.strerror or exc}). Nothing was written. Pass a path in a writable "
            "directory (on Kaggle: under /kaggle/working)") from exc
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise ReadOnlyDatabaseError(
            f"cannot create the experiment database {path}: {path.parent} is not writable "
            "(a read-only file system, or no write permission). Nothing was written. Pass a "
            "path in a writable directory (on Kaggle: under /kaggle/working)")


def _check_sqlite_header(path: Path) -> None:
    try:
        with path.open("rb") as fh:
            head = fh.read(len(SQLITE_MAGIC))
    except OSError as exc:
        raise StorageError(f"cannot read {path} ({exc.strerror or exc}); check its permissions") from exc
    if head and head != SQLITE_MAGIC:   # an empty file is a valid, empty SQLite database
        raise NotADatabaseError(
            f"{path} is not an experiment database: it is not a SQLite file (it starts with "
            f"{head!r}). The file was not modified. Pass the path of an experiment database, "
            "or a path that does not exist yet to create a new one.")


def _writable(path: Path) -> bool:
    """Can SQLite write the file and create its -wal and -shm files beside it?"""
    return os.access(path, os.W_OK) and os.access(path.parent, os.W_OK | os.X_OK)


def readonly_uri(path: Path | str) -> str:
    """A sqlite3 URI that reads ``path`` and creates nothing beside it.

    immutable=1 reads without -wal/-shm files, which a read-only directory cannot hold and
    a read-only connection would leave behind. Not when a -wal exists: it holds committed
    rows (a run is writing) that immutable mode would miss; then its -shm is there too.
    """
    path = Path(path)
    wal = Path(f"{path}-wal")
    immutable = not wal.exists() or not os.access(path.parent, os.W_OK | os.X_OK)
    return f"file:{quote(str(path))}?mode=ro" + ("&immutable=1" if immutable else "")


def _readonly_url(path: Path) -> str:
    return f"sqlite:///{readonly_uri(path)}&uri=true"


def make_engines(location: Location, busy_timeout_s: float) -> tuple[Engine, Engine]:
    """(reader, writer): one pool; the writer's transactions take the write lock first."""
    if location.sqlite:
        engine = create_engine(location.connect_url)
        _install_sqlite_hooks(engine, busy_timeout_s)
    else:
        # pre_ping: a training run holds its engine for hours; servers drop idle connections.
        engine = create_engine(location.connect_url, pool_pre_ping=True)
    return engine, engine.execution_options(**{_WRITE_OPTION: True})


def _install_sqlite_hooks(engine: Engine, busy_timeout_s: float) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None      # sqlite3 must not emit BEGIN: we do
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.execute("PRAGMA synchronous = NORMAL")
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
    detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
    return _classify(detail, where, integrity=isinstance(exc, IntegrityError),
                     operational=isinstance(exc, OperationalError))


def translate_dbapi(exc: Exception, where: str = "the experiment database") -> ExpdbError:
    """The expdb error for an error of the DBAPI driver itself (bare cursors)."""
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    name = type(exc).__name__
    return _classify(detail, where, integrity=name == "IntegrityError", operational=name == "OperationalError")


def _classify(detail: str, where: str, integrity: bool, operational: bool) -> ExpdbError:
    if integrity:
        return ConflictError(f"{where}: the write broke a constraint ({detail})")
    if operational and ("locked" in detail or "busy" in detail):
        return DatabaseLockedError(f"{where} stayed locked by another connection past the busy "
                                   f"timeout ({detail}); the rows are kept and retried")
    if "disk is full" in detail or "No space left" in detail or "disk I/O error" in detail:
        return StorageError(f"{where}: {_disk_problem(detail)} ({detail}); free space on its disk")
    if "readonly" in detail or "read-only" in detail:
        return ReadOnlyDatabaseError(f"{where} cannot be written ({detail}); copy it to a writable "
                                     "location, or open a writable path")
    if "malformed" in detail:
        return CorruptDatabaseError(f"{where} is damaged ({detail}); restore a copy, or salvage it "
                                    "with `sqlite3 OLD.db .recover | sqlite3 NEW.db`")
    if "file is not a database" in detail:
        return NotADatabaseError(f"{where} is not an experiment database ({detail}); pass the "
                                 "path of an experiment database or a new path")
    return StorageError(f"{where}: database error ({detail})")


def _disk_problem(detail: str) -> str:
    return "a disk I/O error, as a full disk gives" if "I/O" in detail else "the disk is full"


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


@dataclass(frozen=True)
class WriteAccess:
    """What a writer of one database writes with: the writer engine (for the background
    writer), its sessions and the database's name for messages. ExperimentDB hands this
    to its recorders, so that they never reach into the database object."""

    engine: Engine
    sessions: sessionmaker
    where: str

    @contextmanager
    def session(self) -> Iterator[Session]:
        with session_scope(self.sessions, self.where) as session:
            yield session

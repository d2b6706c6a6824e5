"""A study-wide lock, so that several workers never start more trials than asked for and
never take over the same interrupted trial twice.

SQLite storages are files on one machine: a lock file beside the database, held with
flock. PostgreSQL storages are shared by machines: a transaction-scoped advisory lock.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa


class StudyLock:
    """Held while a worker counts trials and claims or asks for one."""

    def __init__(self, storage_url: str, study_name: str):
        self._url = sa.engine.make_url(storage_url)
        self._study_name = study_name
        self._threads = threading.Lock()  # flock does not order the threads of one process
        self._engine = None if self._url.get_backend_name() == "sqlite" else sa.create_engine(self._url)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        with self._threads:
            if self._engine is None:
                with _file_lock(_lock_path(self._url.database, self._study_name)):
                    yield
            else:
                with _advisory_lock(self._engine, self._study_name):
                    yield

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()


def _lock_path(database: str | None, study_name: str) -> Path:
    digest = hashlib.sha256(study_name.encode()).hexdigest()[:12]
    base = Path(database) if database and database != ":memory:" else Path("experiments.db")
    return base.with_name(f".{base.name}.study-{digest}.lock")


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextlib.contextmanager
def _advisory_lock(engine: sa.Engine, study_name: str) -> Iterator[None]:
    key = int.from_bytes(hashlib.sha256(f"studies:{study_name}".encode()).digest()[:8], "big", signed=True)
    with engine.begin() as conn:
        conn.execute(sa.text("select pg_advisory_xact_lock(:key)"), {"key": key})
        yield

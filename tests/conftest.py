"""Shared fixtures.

Databases
- ``sqlite_url``: a fresh SQLite file URL under tmp_path.
- ``postgres_url``: a real PostgreSQL server for the whole session, started from the
  machine's initdb/pg_ctl in a temporary directory and reachable only through a Unix
  socket in that directory (listen_addresses=''). Without initdb/pg_ctl the tests that
  use it are skipped, or fail when CI is set, so CI cannot silently lose them.
- ``postgres_db_url``: that server with a new, empty schema (search_path) for one test;
  ``new_postgres_db()`` makes more of them.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

import pytest

PG_BIN_DIRS = ("/usr/lib/postgresql/15/bin",)   # searched after PATH
PG_USER = "postgres"     # initdb refuses to run as root; as root we run it as this user


def _on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _missing(reason: str) -> None:
    if _on_ci():
        pytest.fail(f"PostgreSQL tests cannot run on CI: {reason}", pytrace=False)
    print(f"\nskipping PostgreSQL tests: {reason}")
    pytest.skip(reason)


def _find_pg_tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for directory in PG_BIN_DIRS:
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def _as_server_user() -> list[str]:
    if os.geteuid() != 0:
        return []
    if shutil.which("runuser") is None:
        _missing("running as root needs `runuser` to start PostgreSQL as the postgres user")
    return ["runuser", "-u", PG_USER, "--"]


def _run(cmd: list[str], log: Path | None = None) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        server_log = log.read_text(errors="replace") if log and log.exists() else ""
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}"
                           f"{result.stderr}\n{server_log}")


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """URL of a throwaway PostgreSQL server (database ``postgres``, user ``postgres``)."""
    initdb, pg_ctl = _find_pg_tool("initdb"), _find_pg_tool("pg_ctl")
    if not (initdb and pg_ctl):
        _missing(f"initdb/pg_ctl not found on PATH or in {', '.join(PG_BIN_DIRS)}")
    prefix = _as_server_user()
    # Short path: a Unix socket path must stay under ~100 bytes.
    root = Path(tempfile.mkdtemp(prefix="expdb-pg-"))
    if prefix:
        shutil.chown(root, user=PG_USER, group=PG_USER)
    data, log = root / "data", root / "server.log"
    try:
        _run(prefix + [initdb, "-D", str(data), "-U", PG_USER, "--auth=trust", "--encoding=UTF8",
                       "--locale=C", "--no-sync"])
        settings = {"listen_addresses": "''", "unix_socket_directories": f"'{root}'",
                    "fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
        with (data / "postgresql.conf").open("a") as conf:    # owned by the server user; we are root or it
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
        _run(prefix + [pg_ctl, "-D", str(data), "-l", str(log), "-w", "-t", "60", "start"], log)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    try:
        yield f"postgresql+psycopg://{PG_USER}@/postgres?host={root}"
    finally:
        subprocess.run(prefix + [pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def new_postgres_db(postgres_url: str) -> Iterator:
    """A function that returns the URL of the session's server seen through a new, empty
    schema (set as the search_path of every connection); all are dropped after the test.

    A schema isolates a test like a new database would, without CREATE DATABASE's ~0.3 s.
    """
    import psycopg
    from sqlalchemy import make_url

    server = make_url(postgres_url)
    conninfo = server.set(drivername="postgresql").render_as_string(hide_password=False)
    made: list[str] = []

    def make() -> str:
        schema = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{schema}"')
        made.append(schema)
        return server.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(
            hide_password=False)

    yield make
    with psycopg.connect(conninfo, autocommit=True) as conn:
        for schema in made:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture
def postgres_db_url(new_postgres_db) -> str:
    """The session's server, seen through a new empty schema that is dropped after the test."""
    return new_postgres_db()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """URL of a SQLite file that does not exist yet."""
    return f"sqlite:///{tmp_path / 'experiments.db'}"


# --- slow tests: skipped by default, run with --run-slow (CI runs everything) ---------------
def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run the tests marked slow (end-to-end studies, long runs)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def peak_flops_cache(tmp_path_factory) -> Iterator[Path]:
    """The machine's measured peak (trainer.flops) cached in the session's folder, never in the
    user's home; subprocesses the tests start inherit it."""
    with pytest.MonkeyPatch.context() as mp:
        folder = tmp_path_factory.mktemp("smallgpt-cache")
        mp.setenv("SMALLGPT_CACHE", str(folder))
        yield folder


# --- trainer fixtures (tiny model, slice of the default corpus) ---------------------------
from trainer_fixtures import data_cache, full_tiny_data, tiny_base_cfg, tiny_cfg, tiny_data  # noqa: E402,F401
from simulated_gpu import simulated_gpu  # noqa: E402,F401  (a GPU's answers at torch's API, on the CPU)

"""Creating, upgrading and checking the schema version on every open.

Opening an up-to-date database only reads (no write lock), so dashboards can open a
database that a run is writing to. Creation and upgrades happen in one write
transaction that first reads the version again, so two processes opening a new or
old file at once do not both create or upgrade it; on PostgreSQL an advisory lock
serialises them.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from sqlalchemy import Connection, Engine, inspect, select

from expdb import migrations
from expdb.engine import Location
from expdb.errors import ReadOnlyDatabaseError, SchemaError, SchemaTooNewError
from expdb.models import SCHEMA_VERSION, VERSION_TABLE, Base, SchemaVersion
from expdb.values import utcnow
from expdb.views import VIEWS, create_views, drop_views

# Any 64-bit constant: serialises schema creation between processes on PostgreSQL.
_PG_LOCK_KEY = 0x65787064625F7631


def ensure_schema(reader: Engine, writer: Engine, location: Location) -> None:
    """Create a missing schema; upgrade an older one; refuse a newer one."""
    where = location.where
    with reader.connect() as conn:
        found = read_version(conn)
    _refuse_newer(found, where)
    if found == SCHEMA_VERSION:
        return
    if location.readonly:
        raise _cannot_write(found, where)
    with _schema_transaction(writer) as conn:
        found = read_version(conn)          # another process may have won the race
        _refuse_newer(found, where)
        if found is None:
            _create(conn, where)
        elif found < SCHEMA_VERSION:
            _upgrade(conn, found, where)


def read_version(conn: Connection) -> int | None:
    if not inspect(conn).has_table(VERSION_TABLE):
        return None
    return conn.execute(select(SchemaVersion.version).order_by(SchemaVersion.id.desc())).scalar()


@contextmanager
def _schema_transaction(writer: Engine) -> Iterator[Connection]:
    """A write transaction; on SQLite with foreign keys off (so that rebuilding ``runs``
    does not cascade) and checked before the commit."""
    with writer.connect() as conn:
        sqlite = conn.dialect.name == "sqlite"
        raw = conn.connection.driver_connection if sqlite else None
        if sqlite:
            raw.execute("PRAGMA foreign_keys = OFF")    # outside a transaction, or it is ignored
        try:
            with conn.begin():
                if not sqlite:
                    conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_LOCK_KEY})")
                yield conn
                if sqlite and conn.exec_driver_sql("PRAGMA foreign_key_check").first() is not None:
                    raise SchemaError("the schema change left rows whose run does not exist; "
                                      "nothing was changed")
        finally:
            if sqlite:
                raw.execute("PRAGMA foreign_keys = ON")


def _refuse_newer(found: int | None, where: str) -> None:
    if found is not None and found > SCHEMA_VERSION:
        raise SchemaTooNewError(
            f"{where} has expdb schema version {found}, but this expdb knows only versions up to "
            f"{SCHEMA_VERSION}. Nothing was changed. Upgrade smallgpt-lab (pip install -U "
            "smallgpt-lab) to use this database, or open another one.")


def _cannot_write(found: int | None, where: str) -> ReadOnlyDatabaseError:
    if found is None:
        return ReadOnlyDatabaseError(
            f"{where} holds no experiment database (no expdb tables) and is read-only, so none can "
            "be created in it. Pass the path of an experiment database, or a new path in a "
            "writable directory")
    return ReadOnlyDatabaseError(
        f"{where} has expdb schema version {found} and must be upgraded to version "
        f"{SCHEMA_VERSION} before use, but it is read-only; nothing was changed. Copy it to a "
        "writable directory and open the copy (it is upgraded in place), or merge it into "
        "another database: python -m expdb --db NEW.db merge OLD.db --into NEW.db")


def _create(conn: Connection, where: str) -> None:
    ours = set(Base.metadata.tables) | set(VIEWS)
    inspector = inspect(conn)
    clash = sorted(ours & (set(inspector.get_table_names()) | set(inspector.get_view_names())))
    if clash:
        # Some other tool's tables (mlflow also has "runs"): mixing schemas would corrupt both.
        raise SchemaError(f"{where} already holds tables that expdb did not create ({', '.join(clash)}); "
                          "use a separate file or database for the experiment database")
    Base.metadata.create_all(conn)
    create_views(conn)
    conn.execute(SchemaVersion.__table__.insert().values(version=SCHEMA_VERSION, applied_at=utcnow()))


def _upgrade(conn: Connection, found: int, where: str) -> None:
    if any(version not in migrations.STEPS for version in range(found, SCHEMA_VERSION)):
        raise SchemaError(f"{where} has expdb schema version {found}, which this expdb cannot upgrade "
                          f"to {SCHEMA_VERSION}; open it with the smallgpt-lab release that created it")
    drop_views(conn)
    for version in range(found, SCHEMA_VERSION):
        migrations.STEPS[version](conn)
        conn.execute(SchemaVersion.__table__.insert().values(version=version + 1, applied_at=utcnow()))
    create_views(conn)

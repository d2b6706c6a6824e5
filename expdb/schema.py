"""Creating the tables and views, and checking the schema version on every open.

Opening an up-to-date database only reads (no write lock), so dashboards can open a
database that a run is writing to. Creation happens in one write transaction, so two
processes opening a new file at once do not both create the tables.
"""
from __future__ import annotations

from sqlalchemy import Connection, Engine, inspect, select

from expdb.errors import SchemaError, SchemaTooNewError
from expdb.models import SCHEMA_VERSION, VERSION_TABLE, Base, SchemaVersion
from expdb.values import utcnow

# Any 64-bit constant: serialises schema creation between processes on PostgreSQL.
_PG_LOCK_KEY = 0x65787064625F7631

VIEWS = ("run_summary",)

# One row per run. Counts come from correlated subqueries: portable, and cheap thanks to
# the (run_id, ...) unique indexes. duration_s runs to ended_at, or while a run is still
# running (or died without finishing) to its last write, updated_at.
_RUN_SUMMARY = """
CREATE VIEW run_summary AS
SELECT r.id, r.name, r.status, r.study_name, r.trial_number, r.n_params,
       r.best_val_loss, r.best_step,
       (SELECT COUNT(*) FROM step_metrics s WHERE s.run_id = r.id) AS n_steps,
       (SELECT MAX(s.step) FROM step_metrics s WHERE s.run_id = r.id) AS last_step,
       (SELECT COUNT(*) FROM epoch_metrics e WHERE e.run_id = r.id) AS n_epochs,
       r.resume_count, r.started_at, r.ended_at,
       {duration} AS duration_s
FROM runs r
"""

_DURATION = {
    "sqlite": "(julianday(COALESCE(r.ended_at, r.updated_at)) - julianday(r.started_at)) * 86400.0",
    # EXTRACT returns numeric (Decimal in Python): cast so pandas gets floats.
    "postgresql": "CAST(EXTRACT(EPOCH FROM (COALESCE(r.ended_at, r.updated_at) - r.started_at))"
                  " AS DOUBLE PRECISION)",
}


def ensure_schema(reader: Engine, writer: Engine, where: str) -> None:
    """Create a missing schema; refuse a newer one; leave a current one alone."""
    with reader.connect() as conn:
        found = read_version(conn)
    _refuse_newer(found, where)
    if found == SCHEMA_VERSION:
        return
    with writer.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_LOCK_KEY})")
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


def _refuse_newer(found: int | None, where: str) -> None:
    if found is not None and found > SCHEMA_VERSION:
        raise SchemaTooNewError(
            f"{where} has expdb schema version {found}, but this expdb knows only versions up to "
            f"{SCHEMA_VERSION}. Nothing was changed. Upgrade smallgpt-lab (pip install -U "
            "smallgpt-lab) to use this database, or open another one.")


def _create(conn: Connection, where: str) -> None:
    ours = set(Base.metadata.tables) | set(VIEWS)
    inspector = inspect(conn)
    clash = sorted(ours & (set(inspector.get_table_names()) | set(inspector.get_view_names())))
    if clash:
        # Some other tool's tables (mlflow also has "runs"): mixing schemas would corrupt both.
        raise SchemaError(f"{where} already holds tables that expdb did not create ({', '.join(clash)}); "
                          "use a separate file or database for the experiment database")
    Base.metadata.create_all(conn)
    duration = _DURATION.get(conn.dialect.name, "NULL")
    conn.exec_driver_sql(_RUN_SUMMARY.format(duration=duration))
    conn.execute(SchemaVersion.__table__.insert().values(version=SCHEMA_VERSION, applied_at=utcnow()))


def _upgrade(conn: Connection, found: int, where: str) -> None:
    # Version 1 is the first schema; later versions add their steps here, in order.
    raise SchemaError(f"{where} has expdb schema version {found}, which this expdb cannot upgrade "
                      f"to {SCHEMA_VERSION}; open it with the smallgpt-lab release that created it")

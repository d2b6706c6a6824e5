"""Upgrades of older schemas, in place, one version at a time.

Each step is frozen: it names the tables and columns of its own versions rather than
the current models, so that later versions can change the models without changing
what an old step does. Views are dropped before and recreated (current) after.
On SQLite a table whose columns or keys change is rebuilt (create the new table, copy,
drop the old one, rename), with foreign keys off for the connection so that dropping
``runs`` does not cascade; the caller turns them off and checks them afterwards.

v1 -> v2: ``runs.uid`` (a uid per run, so that merges recognise runs across files);
``step_metrics`` keyed by (run_id, step) without a surrogate id (WITHOUT ROWID on
SQLite); ``step_rollups`` added and filled.

v2 -> v3: ``epoch_metrics`` gains the nullable GPU columns (utilisation, memory used,
temperature, power: trainer.gpu_monitor); ``ALTER TABLE ... ADD COLUMN`` on both
backends, no rebuild. Rows of earlier epochs keep NULL there: nothing was sampled.

v3 -> v4: ``eval_metrics`` and ``epoch_metrics`` gain ``val_bpb`` and ``val_word_ppl``,
``epoch_metrics`` gains ``mfu`` and ``runs`` gains ``best_val_bpb``; nullable columns added
in place, as for v3. Old rows keep NULL: bits per byte needs the bytes and words of the very
tokens evaluated (trainer.data.text_measure), which were never recorded, and a loss alone cannot
give them; nor was the utilisation.
"""
from __future__ import annotations

import uuid
from typing import Callable

from sqlalchemy import (BigInteger, Column, Connection, DateTime, Float, ForeignKey, Integer, MetaData,
                        String, Table, text)
from sqlalchemy.schema import CreateTable

from expdb._write import rollups

_V2 = MetaData()
# The tables of version 2 that the v1 -> v2 step creates (runs only for SQLite's rebuild,
# below; here only as the target of the foreign keys, never created from this stub).
Table("runs", _V2, Column("id", Integer, primary_key=True))
_V2_STEP_METRICS = Table(
    "step_metrics", _V2,
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
    Column("step", Integer, primary_key=True),
    Column("epoch", Integer), Column("loss", Float), Column("lr", Float), Column("grad_norm", Float),
    Column("tokens_per_s", Float), Column("tokens_seen", BigInteger), Column("nan_columns", String),
    sqlite_with_rowid=False)
_V2_STEP_ROLLUPS = Table(
    "step_rollups", _V2,
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
    Column("block", Integer, primary_key=True),
    Column("n_rows", Integer, nullable=False), Column("first_step", Integer, nullable=False),
    Column("last_step", Integer, nullable=False), Column("nan_step", Integer),
    *[Column(f"{m}_{end}{suffix}", Integer if suffix else Float)
      for m in ("loss", "lr", "grad_norm", "tokens_per_s") for end in ("min", "max") for suffix in ("", "_step")],
    sqlite_with_rowid=False)
_V1_RUN_COLUMNS = ("id", "name", "status", "status_reason", "study_name", "trial_number", "config", "dataset",
                   "tokenizer", "n_params", "device", "precision", "host", "out_dir", "started_at", "ended_at",
                   "updated_at", "resume_count", "best_val_loss", "best_step")
_V2_RUNS_SQLITE = """
CREATE TABLE runs__v2 (
    id INTEGER NOT NULL, uid VARCHAR(32) NOT NULL, name VARCHAR NOT NULL, status VARCHAR NOT NULL,
    status_reason TEXT, study_name VARCHAR, trial_number INTEGER, config TEXT NOT NULL,
    dataset TEXT NOT NULL, tokenizer TEXT NOT NULL, n_params BIGINT, device VARCHAR,
    precision VARCHAR, host VARCHAR, out_dir TEXT, started_at DATETIME NOT NULL, ended_at DATETIME,
    updated_at DATETIME NOT NULL, resume_count INTEGER NOT NULL, best_val_loss FLOAT, best_step INTEGER,
    PRIMARY KEY (id),
    CONSTRAINT uq_runs_study_trial UNIQUE (study_name, trial_number),
    CONSTRAINT uq_runs_uid UNIQUE (uid),
    CONSTRAINT ck_runs_status CHECK (status IN ('running', 'completed', 'pruned', 'failed', 'interrupted'))
)"""
_V1_STEP_COLUMNS = "run_id, step, epoch, loss, lr, grad_norm, tokens_per_s, tokens_seen, nan_columns"


def v1_uid(run_id: int, name: str, started_at, host: str | None) -> str:
    """A uid for a run made before uids existed: derived from the run itself, so that two
    copies of one version-1 file, upgraded apart, give their runs the same uids."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"expdb:v1-run:{run_id}:{name}:{started_at.isoformat()}:{host}").hex


def _v1_uids(conn: Connection) -> list[dict]:
    rows = conn.execute(text("SELECT id, name, started_at, host FROM runs")
                        .columns(id=Integer, name=String, started_at=DateTime, host=String)).all()
    return [{"id": r.id, "uid": v1_uid(r.id, r.name, r.started_at, r.host)} for r in rows]


def _v1_to_v2(conn: Connection) -> None:
    uids = _v1_uids(conn)
    if conn.dialect.name == "sqlite":
        _v1_to_v2_sqlite(conn)
    else:
        conn.exec_driver_sql("ALTER TABLE runs ADD COLUMN uid VARCHAR(32)")
        conn.exec_driver_sql("ALTER TABLE step_metrics DROP CONSTRAINT uq_step_metrics_run_step")
        conn.exec_driver_sql("ALTER TABLE step_metrics DROP COLUMN id")
        conn.exec_driver_sql("ALTER TABLE step_metrics ADD PRIMARY KEY (run_id, step)")
    if uids:
        conn.execute(text("UPDATE runs SET uid = :uid WHERE id = :id"), uids)
    if conn.dialect.name != "sqlite":
        conn.exec_driver_sql("ALTER TABLE runs ALTER COLUMN uid SET NOT NULL")
        conn.exec_driver_sql("ALTER TABLE runs ADD CONSTRAINT uq_runs_uid UNIQUE (uid)")
    conn.execute(CreateTable(_V2_STEP_ROLLUPS))
    rollups.rebuild(conn, [u["id"] for u in uids], conn.dialect.paramstyle)


def _v1_to_v2_sqlite(conn: Connection) -> None:
    columns = ", ".join(_V1_RUN_COLUMNS)
    conn.exec_driver_sql(_V2_RUNS_SQLITE)
    conn.exec_driver_sql(f"INSERT INTO runs__v2 ({columns}, uid) SELECT {columns}, 'v1-' || id FROM runs")
    conn.exec_driver_sql("DROP TABLE runs")
    conn.exec_driver_sql("ALTER TABLE runs__v2 RENAME TO runs")
    conn.exec_driver_sql("ALTER TABLE step_metrics RENAME TO step_metrics__v1")
    conn.execute(CreateTable(_V2_STEP_METRICS))
    conn.exec_driver_sql(f"INSERT INTO step_metrics ({_V1_STEP_COLUMNS}) SELECT {_V1_STEP_COLUMNS} "
                         "FROM step_metrics__v1 ORDER BY run_id, step")
    conn.exec_driver_sql("DROP TABLE step_metrics__v1")


_V3_EPOCH_GPU_COLUMNS = ("gpu_util_pct", "gpu_util_max_pct", "gpu_mem_used_mb", "gpu_temp_c", "gpu_power_w")


def _v2_to_v3(conn: Connection) -> None:
    # FLOAT is SQLAlchemy's Float on both: REAL affinity on SQLite, double precision on PostgreSQL.
    for name in _V3_EPOCH_GPU_COLUMNS:
        conn.exec_driver_sql(f"ALTER TABLE epoch_metrics ADD COLUMN {name} FLOAT")


_V4_NEW_COLUMNS = (("eval_metrics", "val_bpb"), ("eval_metrics", "val_word_ppl"),
                   ("epoch_metrics", "val_bpb"), ("epoch_metrics", "val_word_ppl"), ("epoch_metrics", "mfu"),
                   ("runs", "best_val_bpb"))


def _v3_to_v4(conn: Connection) -> None:
    # As in v2 -> v3: FLOAT on both backends, NULL in every existing row (nothing to derive it from).
    for table, name in _V4_NEW_COLUMNS:
        conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {name} FLOAT")


# from_version -> the step to from_version + 1
STEPS: dict[int, Callable[[Connection], None]] = {1: _v1_to_v2, 2: _v2_to_v3, 3: _v3_to_v4}

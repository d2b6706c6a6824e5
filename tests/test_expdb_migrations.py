"""Schema versions: saved database files of earlier versions are upgraded in place.

tests/data/expdb_v1.db was made by schema version 1 (see tests/data/make_expdb_file.py);
tests/data/expdb_v2.db by version 2, the current one: when version 3 comes, it is the
file whose upgrade to test (see test_current_file_needs_no_upgrade).
"""
from __future__ import annotations

import math
import multiprocessing
import shutil
import sqlite3
from pathlib import Path

import optuna
import pytest
from sqlalchemy import create_engine, inspect, text

import expdb
from expdb.migrations import v1_uid
from expdb.models import SCHEMA_VERSION

DATA = Path(__file__).parent / "data"


@pytest.fixture
def v1_copy(tmp_path: Path) -> Path:
    path = tmp_path / "experiments.db"
    shutil.copy(DATA / "expdb_v1.db", path)
    return path


def schema_of(url: str) -> dict:
    """Tables, columns, keys, uniques, foreign keys and indexes, as the inspector sees them."""
    engine = create_engine(url)
    inspector = inspect(engine)
    tables = sorted(t for t in inspector.get_table_names() if t in expdb_tables())
    shape = {t: (sorted((c["name"], str(c["type"]), c["nullable"]) for c in inspector.get_columns(t)),
                 inspector.get_pk_constraint(t)["constrained_columns"],
                 sorted((u["name"], tuple(u["column_names"])) for u in inspector.get_unique_constraints(t)),
                 sorted((tuple(f["constrained_columns"]), f["referred_table"], f["options"].get("ondelete"))
                        for f in inspector.get_foreign_keys(t)),
                 sorted((i["name"], tuple(i["column_names"]), i["unique"]) for i in inspector.get_indexes(t)))
             for t in tables}
    views = sorted(inspector.get_view_names())
    engine.dispose()
    return {"tables": shape, "views": views}


def expdb_tables() -> set[str]:
    from expdb.models import Base
    return set(Base.metadata.tables)


def test_v1_file_is_upgraded_in_place_and_keeps_its_data(v1_copy: Path):
    before = sqlite3.connect(v1_copy)
    old_runs = before.execute("SELECT id, name, started_at, host, status FROM runs ORDER BY id").fetchall()
    old_steps = before.execute("SELECT run_id, step, loss, nan_columns FROM step_metrics ORDER BY run_id, step").fetchall()
    before.close()

    with expdb.open(v1_copy) as db:
        runs = db.runs()
        assert runs[["id", "name", "status"]].values.tolist() == [[r[0], r[1], r[4]] for r in old_runs]
        assert runs["n_steps"].tolist() == [30, 30, 31] and runs["n_epochs"].tolist() == [2, 2, 2]
        assert runs["uid"].str.len().tolist() == [32] * 3 and runs["uid"].is_unique
        assert math.isnan(db.steps(3).set_index("step").loc[31, "loss"])
        assert db.steps(3).set_index("step").loc[31, "grad_norm"] == math.inf
        assert db.checkpoints(1)["deleted"].tolist() == [True, False]
        assert db.study("v1-study")["params_lr"].notna().all()
        assert len(db.step_series(1, max_points=9)) <= 9
        assert db.recorder("v1-study", 2).start_run(_info()) == 4      # writing works too

    conn = sqlite3.connect(v1_copy)
    assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    assert [v for v, in conn.execute("SELECT version FROM expdb_schema_version ORDER BY id")] == [1, 2]
    steps = conn.execute("SELECT run_id, step, loss, nan_columns FROM step_metrics WHERE run_id < 4 "
                         "ORDER BY run_id, step").fetchall()
    uids = conn.execute("SELECT uid FROM runs WHERE id < 4 ORDER BY id").fetchall()
    conn.close()
    assert steps == old_steps
    # Derived from each run, so two copies of one v1 file agree on their runs' uids.
    assert [u for u, in uids] == [v1_uid(i, name, _dt(started), host) for i, name, started, host, _ in old_runs]
    study = optuna.load_study(study_name="v1-study", storage=f"sqlite:///{v1_copy}")
    assert [t.user_attrs["run_id"] for t in study.trials] == [1, 2]


def test_upgraded_schema_equals_a_new_one(v1_copy: Path, tmp_path: Path):
    expdb.open(v1_copy).close()
    expdb.open(tmp_path / "new.db").close()
    assert schema_of(f"sqlite:///{v1_copy}") == schema_of(f"sqlite:///{tmp_path / 'new.db'}")


def _open_and_count(path: str, queue) -> None:
    with expdb.open(path) as db:
        queue.put(len(db.runs()))


def test_two_processes_opening_a_v1_file_upgrade_it_once(v1_copy: Path):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    workers = [ctx.Process(target=_open_and_count, args=(str(v1_copy), queue)) for _ in range(2)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(timeout=60)
    assert [p.exitcode for p in workers] == [0, 0]
    assert [queue.get(timeout=5) for _ in workers] == [3, 3]
    conn = sqlite3.connect(v1_copy)
    assert [v for v, in conn.execute("SELECT version FROM expdb_schema_version ORDER BY id")] == [1, 2]
    conn.close()


def test_read_only_v1_file_is_refused_untouched(v1_copy: Path):
    before = v1_copy.read_bytes()
    with pytest.raises(expdb.ReadOnlyDatabaseError, match="version 1 and must be upgraded.*Copy it"):
        expdb.open(v1_copy, readonly=True)
    assert v1_copy.read_bytes() == before
    assert sorted(p.name for p in v1_copy.parent.iterdir()) == ["experiments.db"]


def test_current_file_needs_no_upgrade(tmp_path: Path):
    # When SCHEMA_VERSION becomes 3, turn this into the upgrade test of expdb_v2.db (as above
    # for v1) and save an expdb_v3.db made by the new schema.
    path = tmp_path / "experiments.db"
    shutil.copy(DATA / f"expdb_v{SCHEMA_VERSION}.db", path)
    with expdb.open(path) as db:
        assert db.runs()["n_steps"].tolist() == [30, 30, 31]
        assert db.studies()["n_completed"].tolist() == [2]
    conn = sqlite3.connect(path)
    assert [v for v, in conn.execute("SELECT version FROM expdb_schema_version")] == [SCHEMA_VERSION]
    conn.close()


@pytest.mark.postgres
def test_v1_schema_on_postgres_is_upgraded(new_postgres_db):
    """The saved v1 file's tables and rows, recreated on the server, then opened."""
    from sqlalchemy import MetaData, insert, select

    upgraded, fresh = new_postgres_db(), new_postgres_db()
    v1 = create_engine(f"sqlite:///{DATA / 'expdb_v1.db'}")
    pg = create_engine(upgraded)
    meta = MetaData()
    meta.reflect(v1, only=["runs", "step_metrics", "eval_metrics", "epoch_metrics", "checkpoints", "events",
                           "expdb_schema_version"])
    for table in meta.tables.values():
        for column in table.c:
            column.type = column.type.as_generic()      # SQLite's DATETIME is PostgreSQL's TIMESTAMP
    with v1.connect() as src, pg.begin() as dst:
        meta.create_all(dst)
        for table in meta.sorted_tables:
            rows = [dict(r) for r in src.execute(select(table)).mappings()]
            dst.execute(insert(table), rows)
            if "id" in table.c:     # as a restore would: the id sequence continues after the rows
                dst.exec_driver_sql(f"SELECT setval('{table.name}_id_seq', {max(r['id'] for r in rows)})")
    v1.dispose()
    pg.dispose()
    with expdb.open(upgraded) as db:
        assert db.runs()["n_steps"].tolist() == [30, 30, 31]
        assert math.isnan(db.steps(3).set_index("step").loc[31, "loss"])
        assert db.recorder("v1-study", 2).start_run(_info()) == 4
    expdb.open(fresh).close()
    assert schema_of(upgraded) == schema_of(fresh)


def _dt(text_value: str):
    from datetime import datetime
    return datetime.fromisoformat(text_value)


def _info():
    from test_expdb import make_info
    return make_info("after-upgrade")

"""Schema versions: saved database files of earlier versions are upgraded in place.

tests/data/expdb_vN.db was made by schema version N (see tests/data/make_expdb_file.py);
expdb_v4.db by the current one: when version 5 comes, it is the file whose upgrade to test
(as test_v3_file_gains_the_bpb_columns does for expdb_v3.db; see test_current_file_needs_no_upgrade).
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
from expdb.__main__ import main as expdb_cli
from expdb.migrations import v1_uid
from expdb.models import SCHEMA_VERSION

DATA = Path(__file__).parent / "data"
GPU_COLUMNS = ["gpu_util_pct", "gpu_util_max_pct", "gpu_mem_used_mb", "gpu_temp_c", "gpu_power_w"]
TEXT_COLUMNS = ["val_bpb", "val_word_ppl"]      # schema 4, in eval_metrics and epoch_metrics


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
    assert [v for v, in conn.execute("SELECT version FROM expdb_schema_version ORDER BY id")] == [1, 2, 3, 4]
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
        p.join(timeout=120)     # a bound on a hang, not on how fast a spawned process starts
    assert [p.exitcode for p in workers] == [0, 0]
    assert [queue.get(timeout=5) for _ in workers] == [3, 3]
    conn = sqlite3.connect(v1_copy)
    assert [v for v, in conn.execute("SELECT version FROM expdb_schema_version ORDER BY id")] == [1, 2, 3, 4]
    conn.close()


def test_read_only_v1_file_is_refused_untouched(v1_copy: Path):
    before = v1_copy.read_bytes()
    with pytest.raises(expdb.ReadOnlyDatabaseError, match="version 1 and must be upgraded.*Copy it"):
        expdb.open(v1_copy, readonly=True)
    assert v1_copy.read_bytes() == before
    assert sorted(p.name for p in v1_copy.parent.iterdir()) == ["experiments.db"]


def _rows(path: Path, table: str, order: str) -> list[tuple]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(f"SELECT * FROM {table} ORDER BY {order}").fetchall()
    finally:
        conn.close()


V2_TABLES = {"runs": "id", "step_metrics": "run_id, step", "step_rollups": "run_id, block",
             "eval_metrics": "id", "epoch_metrics": "id", "checkpoints": "id", "events": "id"}


def test_v2_file_gains_the_gpu_columns_and_keeps_every_row(tmp_path: Path):
    path = tmp_path / "experiments.db"
    shutil.copy(DATA / "expdb_v2.db", path)
    before = {table: _rows(path, table, order) for table, order in V2_TABLES.items()}
    expdb.check_database(path, create=False, write=True)      # an upgradable version: the pre-check accepts it

    with expdb.open(path) as db:
        epochs = db.epochs()
        assert len(epochs) == 6 and epochs[GPU_COLUMNS].isna().all().all()     # nothing was sampled then
        assert db.runs()["n_steps"].tolist() == [30, 30, 31]
        assert db.recorder("v1-study", 2).start_run(_info()) == 4      # writing works too

    after = {table: _rows(path, table, order) for table, order in V2_TABLES.items()}
    # Appended, NULL: the GPU columns (v3), then val_bpb, val_word_ppl, mfu (v4).
    assert after["epoch_metrics"] == [row + (None,) * 8 for row in before["epoch_metrics"]]
    assert after["eval_metrics"] == [row + (None,) * 2 for row in before["eval_metrics"]]
    assert after["runs"][:3] == [row + (None,) for row in before["runs"]]
    changed = ("runs", "epoch_metrics", "eval_metrics")
    assert {t: r for t, r in after.items() if t not in changed} == {t: r for t, r in before.items() if t not in changed}
    conn = sqlite3.connect(path)
    assert [v for v, in conn.execute("SELECT version FROM expdb_schema_version ORDER BY id")] == [2, 3, 4]
    assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    conn.close()
    assert expdb_cli(["--db", str(path), "check", "--no-files"]) == 0, "python -m expdb check"
    assert schema_of(f"sqlite:///{path}") == _fresh_schema(tmp_path)


def test_upgraded_v2_file_takes_gpu_columns(tmp_path: Path):
    path = tmp_path / "experiments.db"
    shutil.copy(DATA / "expdb_v2.db", path)
    with expdb.open(path) as db:
        rec = db.recorder()
        run_id = rec.start_run(_info())
        rec.log_epoch(0, {"step": 5, "train_loss": 2.0, "gpu_util_pct": 80.0, "gpu_power_w": 120.0,
                          "gpu0_util": 80.0})      # a key without a column is ignored
        rec.finish("completed")
        row = db.epochs(run_id).iloc[0]
    assert (row["gpu_util_pct"], row["gpu_power_w"]) == (80.0, 120.0) and math.isnan(row["gpu_temp_c"])


def test_v3_file_gains_the_bpb_columns_and_keeps_every_row(tmp_path: Path):
    path = tmp_path / "experiments.db"
    shutil.copy(DATA / "expdb_v3.db", path)
    before = {table: _rows(path, table, order) for table, order in V2_TABLES.items()}
    expdb.check_database(path, create=False, write=True)

    with expdb.open(path) as db:
        evals, epochs, runs = db.evals(), db.epochs(), db.runs()
        # Never derived: the bytes of the evaluated text were not counted before version 4.
        assert len(evals) == 9 and evals[TEXT_COLUMNS].isna().all().all()
        assert len(epochs) == 6 and epochs[TEXT_COLUMNS + ["mfu"]].isna().all().all()
        assert runs["best_val_bpb"].isna().all() and runs["best_val_loss"].notna().all()
        assert db.run(1).best_val_bpb is None
        assert db.studies()["best_val_bpb"].isna().all()
        gpu = epochs.set_index(["run_id", "epoch"])[GPU_COLUMNS]
        assert gpu.loc[1].values.tolist() == [[87.5, 100.0, 14_000.0, 71.0, 65.0]] * 2     # data kept
        run_id = _record_bpb(db)
        assert db.run(run_id).best_val_bpb == 0.5

    after = {table: _rows(path, table, order) for table, order in V2_TABLES.items()}
    assert after["epoch_metrics"][:6] == [row + (None,) * 3 for row in before["epoch_metrics"]]
    assert after["eval_metrics"][:9] == [row + (None,) * 2 for row in before["eval_metrics"]]
    assert after["runs"][:3] == [row + (None,) for row in before["runs"]]
    for table in ("step_metrics", "step_rollups", "checkpoints"):
        assert after[table] == before[table], table
    conn = sqlite3.connect(path)
    assert [v for v, in conn.execute("SELECT version FROM expdb_schema_version ORDER BY id")] == [3, 4]
    assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    conn.close()
    assert expdb_cli(["--db", str(path), "check", "--no-files"]) == 0, "python -m expdb check"
    assert schema_of(f"sqlite:///{path}") == _fresh_schema(tmp_path)


def _record_bpb(db) -> int:
    """A run that logs the version-4 metrics; the best loss's bpb becomes the run's."""
    rec = db.recorder()
    run_id = rec.start_run(_info())
    rec.log_eval(10, 0, {"val_loss": 2.0, "val_ppl": math.exp(2.0), "val_bpb": 0.7, "val_word_ppl": 50.0})
    rec.log_eval(20, 0, {"val_loss": 1.5, "val_ppl": math.exp(1.5), "val_bpb": 0.5, "val_word_ppl": math.nan})
    rec.log_eval(30, 1, {"val_loss": 1.8, "val_ppl": math.exp(1.8), "val_bpb": 0.6, "val_word_ppl": 40.0})
    rec.log_epoch(0, {"step": 20, "val_loss": 1.5, "val_bpb": 0.5, "val_word_ppl": 45.0, "mfu": 0.3})
    rec.finish("completed")
    evals = db.evals(run_id)
    assert evals["val_bpb"].tolist() == [0.7, 0.5, 0.6]
    assert math.isnan(evals["val_word_ppl"].iloc[1])            # no words: NaN, stored NULL
    assert db.epochs(run_id)[["val_bpb", "val_word_ppl", "mfu"]].values.tolist() == [[0.5, 45.0, 0.3]]
    return run_id


def test_current_file_needs_no_upgrade(tmp_path: Path):
    # When SCHEMA_VERSION becomes 5, turn this into the upgrade test of expdb_v4.db (as above
    # for v3) and save an expdb_v5.db made by the new schema.
    path = tmp_path / "experiments.db"
    shutil.copy(DATA / f"expdb_v{SCHEMA_VERSION}.db", path)
    with expdb.open(path) as db:
        assert db.runs()["n_steps"].tolist() == [30, 30, 31]
        assert db.studies()["n_completed"].tolist() == [2]
        epochs = db.epochs().set_index(["run_id", "epoch"])
        evals = db.evals().set_index(["run_id", "step"])
        runs = db.runs().set_index("id")
    gpu = epochs[GPU_COLUMNS]
    assert gpu.loc[1].values.tolist() == [[87.5, 100.0, 14_000.0, 71.0, 65.0]] * 2
    assert gpu.loc[3].isna().all().all()
    assert epochs.loc[1, "mfu"].tolist() == [0.25, 0.25] and epochs.loc[3, "mfu"].isna().all()
    # make_expdb_file: 4 bytes a token, so bpb = loss / 4 / ln 2; run 3's text has no words.
    assert evals["val_bpb"].tolist() == pytest.approx((evals["val_loss"] / 4 / math.log(2)).tolist())
    assert evals.loc[3, "val_word_ppl"].isna().all() and evals.loc[1, "val_word_ppl"].notna().all()
    assert runs["best_val_bpb"].tolist() == pytest.approx((runs["best_val_loss"] / 4 / math.log(2)).tolist())
    conn = sqlite3.connect(path)
    assert [v for v, in conn.execute("SELECT version FROM expdb_schema_version")] == [SCHEMA_VERSION]
    conn.close()
    assert schema_of(f"sqlite:///{path}") == _fresh_schema(tmp_path)


def _fresh_schema(tmp_path: Path) -> dict:
    expdb.open(tmp_path / "fresh.db").close()
    return schema_of(f"sqlite:///{tmp_path / 'fresh.db'}")


def _restore_on_postgres(db_file: Path, url: str) -> None:
    """The tables and rows of a saved SQLite file, recreated on the server as a restore would."""
    from sqlalchemy import MetaData, insert, select

    source = create_engine(f"sqlite:///{db_file}")
    pg = create_engine(url)
    meta = MetaData()
    meta.reflect(source, only=[t for t in inspect(source).get_table_names() if t in expdb_tables()])
    for table in meta.tables.values():
        for column in table.c:
            column.type = column.type.as_generic()      # SQLite's DATETIME is PostgreSQL's TIMESTAMP
    with source.connect() as src, pg.begin() as dst:
        meta.create_all(dst)
        for table in meta.sorted_tables:
            rows = [dict(r) for r in src.execute(select(table)).mappings()]
            dst.execute(insert(table), rows)
            if "id" in table.c:     # as a restore would: the id sequence continues after the rows
                dst.exec_driver_sql(f"SELECT setval('{table.name}_id_seq', {max(r['id'] for r in rows)})")
    source.dispose()
    pg.dispose()


@pytest.mark.postgres
def test_v1_schema_on_postgres_is_upgraded(new_postgres_db):
    """The saved v1 file's tables and rows, recreated on the server, then opened."""
    upgraded, fresh = new_postgres_db(), new_postgres_db()
    _restore_on_postgres(DATA / "expdb_v1.db", upgraded)
    with expdb.open(upgraded) as db:
        assert db.runs()["n_steps"].tolist() == [30, 30, 31]
        assert math.isnan(db.steps(3).set_index("step").loc[31, "loss"])
        assert db.recorder("v1-study", 2).start_run(_info()) == 4
    expdb.open(fresh).close()
    assert schema_of(upgraded) == schema_of(fresh)


@pytest.mark.postgres
def test_v2_schema_on_postgres_gains_the_gpu_columns(postgres_db_url, new_postgres_db):
    """The saved v2 file's tables and rows on the server, opened: ALTER TABLE adds the columns."""
    fresh = new_postgres_db()
    _restore_on_postgres(DATA / "expdb_v2.db", postgres_db_url)
    with expdb.open(postgres_db_url) as db:
        epochs = db.epochs()
        assert len(epochs) == 6 and epochs[GPU_COLUMNS].isna().all().all()
        assert epochs["train_loss"].notna().all()
        assert db.runs()["n_steps"].tolist() == [30, 30, 31]
        rec = db.recorder("v1-study", 2)
        run_id = rec.start_run(_info())
        rec.log_epoch(0, {"step": 1, "gpu_util_pct": 55.0, "gpu_mem_used_mb": 900.0})
        rec.finish("completed")
        assert db.epochs(run_id)[["gpu_util_pct", "gpu_mem_used_mb"]].values.tolist() == [[55.0, 900.0]]
    assert _versions_on_postgres(postgres_db_url) == [2, 3, 4]
    expdb.open(fresh).close()
    assert schema_of(postgres_db_url) == schema_of(fresh)


@pytest.mark.postgres
def test_v3_schema_on_postgres_gains_the_bpb_columns(postgres_db_url, new_postgres_db):
    """The saved v3 file's tables and rows on the server, opened: ALTER TABLE adds the v4 columns."""
    fresh = new_postgres_db()
    _restore_on_postgres(DATA / "expdb_v3.db", postgres_db_url)
    with expdb.open(postgres_db_url) as db:
        evals, epochs, runs = db.evals(), db.epochs(), db.runs()
        assert len(evals) == 9 and evals[TEXT_COLUMNS].isna().all().all() and evals["val_loss"].notna().all()
        assert len(epochs) == 6 and epochs[TEXT_COLUMNS + ["mfu"]].isna().all().all()
        assert epochs["gpu_util_pct"].notna().sum() == 4
        assert runs["best_val_bpb"].isna().all() and runs["n_steps"].tolist() == [30, 30, 31]
        run_id = _record_bpb(db)
        assert db.run(run_id).best_val_bpb == 0.5
        assert db.runs().set_index("id").loc[run_id, "best_val_bpb"] == 0.5
    assert _versions_on_postgres(postgres_db_url) == [3, 4]
    expdb.open(fresh).close()
    assert schema_of(postgres_db_url) == schema_of(fresh)


def _versions_on_postgres(url: str) -> list[int]:
    """The schema versions the server's database records, oldest first."""
    engine = create_engine(url)
    with engine.connect() as conn:
        versions = conn.execute(text("SELECT version FROM expdb_schema_version ORDER BY id")).scalars().all()
    engine.dispose()
    return versions


def _dt(text_value: str):
    from datetime import datetime
    return datetime.fromisoformat(text_value)


def _info():
    from test_expdb import make_info
    return make_info("after-upgrade")

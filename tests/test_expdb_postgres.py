"""PostgreSQL-only checks. The recorder and read tests of test_expdb.py also run on
PostgreSQL through their parametrized ``db_url`` fixture."""
from __future__ import annotations

import threading

import pytest
from sqlalchemy import create_engine, inspect, text

import expdb
from test_expdb import make_info, record_run

pytestmark = pytest.mark.postgres


def test_server_is_private_postgres_15(postgres_url: str):
    engine = create_engine(postgres_url)
    with engine.connect() as conn:
        assert conn.execute(text("SHOW listen_addresses")).scalar() == ""
        assert conn.execute(text("SHOW server_version")).scalar().startswith("15")
    engine.dispose()


def test_schema_has_named_constraints_and_the_view(postgres_db_url: str):
    expdb.open(postgres_db_url).close()
    engine = create_engine(postgres_db_url)
    inspector = inspect(engine)
    assert {"runs", "step_metrics", "step_rollups", "eval_metrics", "epoch_metrics", "checkpoints", "events",
            "expdb_schema_version"} <= set(inspector.get_table_names())
    assert sorted(inspector.get_view_names()) == ["run_summary", "study_summary"]
    uniques = {u["name"]: u["column_names"] for u in inspector.get_unique_constraints("eval_metrics")}
    assert uniques == {"uq_eval_metrics_run_step": ["run_id", "step"]}
    assert inspector.get_pk_constraint("step_metrics")["constrained_columns"] == ["run_id", "step"]
    runs_uniques = {u["name"]: u["column_names"] for u in inspector.get_unique_constraints("runs")}
    assert runs_uniques == {"uq_runs_study_trial": ["study_name", "trial_number"], "uq_runs_uid": ["uid"]}
    assert [fk["options"].get("ondelete") for fk in inspector.get_foreign_keys("events")] == ["CASCADE"]
    engine.dispose()


def test_concurrent_opens_create_the_schema_once(postgres_db_url: str):
    errors: list[BaseException] = []

    def open_and_record(i: int) -> None:
        try:
            with expdb.open(postgres_db_url) as db:
                record_run(db, make_info(f"p{i}"), steps=range(1, 31))
        except BaseException as exc:    # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=open_and_record, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with expdb.open(postgres_db_url) as db:
        runs = db.runs()
        assert sorted(runs["name"]) == ["p0", "p1", "p2"] and runs["n_steps"].tolist() == [30] * 3
        assert runs["duration_s"].dtype == "float64"


def test_deleting_a_run_cascades(postgres_db_url: str):
    with expdb.open(postgres_db_url) as db:
        run_id = record_run(db, make_info(), steps=range(1, 11))
        engine = create_engine(postgres_db_url)
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM runs WHERE id = :id"), {"id": run_id})
        engine.dispose()
        assert db.runs().empty and db.epochs().empty and db.events().empty


def test_a_table_locked_by_another_session_delays_rows_not_the_caller(postgres_db_url: str):
    # The lock is this test's own until the loop ends: a log call that waited for it would
    # never return, so the loop finishing with no row in the table is the proof (no stopwatch).
    import time

    import psycopg
    from sqlalchemy import make_url

    with expdb.open(postgres_db_url) as db:
        rec = db.recorder(flush_interval_s=0.05, sync_timeout_s=0.1)
        run_id = rec.start_run(make_info())
        url = make_url(postgres_db_url).set(drivername="postgresql").render_as_string(hide_password=False)
        with psycopg.connect(url) as blocker:
            blocker.execute("LOCK TABLE step_metrics IN ACCESS EXCLUSIVE MODE")   # no reads, no writes
            for step in range(300):
                rec.log_step(step, {"loss": 1.0 / (step + 1)})
                if step % 100 == 99:
                    rec.log_epoch(step // 100, {"train_loss": 1.0, "step": step})   # waits at most 0.1 s
                time.sleep(0.002)
            assert blocker.execute("SELECT COUNT(*) FROM step_metrics").fetchone()[0] == 0   # all held back
        # the blocker's transaction ends with its connection
        rec.finish("completed")
        assert db.steps(run_id)["step"].tolist() == list(range(300)) and len(db.epochs(run_id)) == 3


def test_readonly_open_never_writes(postgres_db_url: str):
    with expdb.open(postgres_db_url) as db:
        record_run(db, make_info())
    with expdb.open(postgres_db_url, readonly=True) as db:
        assert len(db.steps(1)) == 20
        with pytest.raises(expdb.ReadOnlyDatabaseError, match="cannot record a run"):
            db.recorder()
    fresh = postgres_db_url.replace("search_path%3D", "search_path%3Dmissing_")
    with pytest.raises(expdb.ReadOnlyDatabaseError, match="holds no experiment database"):
        expdb.open(fresh, readonly=True)

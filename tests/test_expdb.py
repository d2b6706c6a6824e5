"""expdb against real databases: SQLite files, and PostgreSQL through the conftest server.

Tests that take ``db_url`` run on both backends; the rest are about SQLite files.
"""
from __future__ import annotations

import math
import multiprocessing
import sqlite3
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from sqlalchemy import create_engine, text

import expdb
from expdb.engine import DEFAULT_BUSY_TIMEOUT_S
from expdb.models import SCHEMA_VERSION
from trainer.recorder import RunInfo

STEPS = 20
EVAL_EVERY = 5


def make_info(name: str = "run", **changes) -> RunInfo:
    config = {"out_dir": f"runs/{name}", "lr": 1e-3, "n_layer": 2, "data_files": ["a.txt"]}
    config.update(changes.pop("config", {}))
    fields = dict(dataset={"source": "stdlib", "train": {"documents": 3}}, tokenizer={"kind": "bpe", "vocab_size": 512},
                  n_params=12345, device="cpu", precision="fp32", host="testhost")
    return RunInfo(name=name, config=config, **{**fields, **changes})


def step_metrics(step: int) -> dict[str, float]:
    return {"loss": 5.0 - 0.1 * step, "lr": 1e-3 * step / STEPS, "grad_norm": 1.0 + step,
            "tokens_per_s": 1000.0 + step, "epoch": step // 10, "tokens_seen": 512 * step}


def record_run(db: expdb.ExperimentDB, info: RunInfo, steps: range = range(1, STEPS + 1),
               recorder: expdb.DBRecorder | None = None, status: str = "completed") -> int:
    """A run's life as the trainer logs it: steps, evals, epoch ends, a checkpoint, an event."""
    rec = recorder or db.recorder()
    run_id = rec.start_run(info)
    for step in steps:
        rec.log_step(step, step_metrics(step))
        if step % EVAL_EVERY == 0:
            rec.log_eval(step, step // 10, {"val_loss": 10.0 / step, "val_ppl": math.exp(10.0 / step)})
        if step % 10 == 0:
            rec.log_epoch(step // 10 - 1, {"train_loss": 4.0, "val_loss": 10.0 / step, "step": step,
                                           "epoch_seconds": 1.5, "mem_process_mb": 100.0})
    rec.log_checkpoint(f"runs/{info.name}/best.pt", "best", steps[-1], 0.5, 2048, "ab" * 32)
    rec.log_event("signal", steps[-1], {"signal": "SIGTERM", "nested": {"a": [1, 2]}})
    rec.finish(status, "done" if status == "completed" else "stopped")
    return run_id


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest) -> str:
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "postgres_db_url")


@pytest.fixture
def db(db_url: str):
    with expdb.open(db_url) as database:
        yield database


def sqlite_path(url: str) -> Path:
    return Path(url.removeprefix("sqlite:///"))


# -- both backends ----------------------------------------------------------------------
def test_lifecycle_reads_back_what_was_logged(db: expdb.ExperimentDB):
    run_id = record_run(db, make_info("alpha"), recorder=db.recorder("study-a", 3))

    record = db.run(run_id)
    assert (record.name, record.status, record.status_reason) == ("alpha", "completed", "done")
    assert (record.study_name, record.trial_number) == ("study-a", 3)
    assert record.config["data_files"] == ["a.txt"] and record.config["out_dir"] == "runs/alpha"
    # the column is portable (expdb.paths): outside the database's folder, absolute
    assert db.resolve_path(record.out_dir) == Path("runs/alpha").absolute()
    assert record.dataset["train"] == {"documents": 3} and record.tokenizer["vocab_size"] == 512
    assert (record.n_params, record.device, record.precision, record.host) == (12345, "cpu", "fp32", "testhost")
    assert record.best_val_loss == pytest.approx(10.0 / STEPS) and record.best_step == STEPS
    assert record.ended_at >= record.started_at and record.resume_count == 0

    steps = db.steps(run_id)
    assert steps["step"].tolist() == list(range(1, STEPS + 1))
    for column in ("loss", "lr", "grad_norm", "tokens_per_s", "epoch", "tokens_seen"):
        assert steps[column].tolist() == pytest.approx([step_metrics(s)[column] for s in range(1, STEPS + 1)])
    evals = db.evals(run_id)
    assert evals["step"].tolist() == [5, 10, 15, 20]
    assert evals["val_ppl"].tolist() == pytest.approx([math.exp(10.0 / s) for s in (5, 10, 15, 20)])
    epochs = db.epochs(run_id)
    assert epochs["epoch"].tolist() == [0, 1] and epochs["step"].tolist() == [10, 20]
    assert epochs["epoch_seconds"].tolist() == [1.5, 1.5] and epochs["grad_norm"].isna().all()
    checkpoints = db.checkpoints(run_id)
    assert checkpoints[["kind", "step", "size_bytes", "deleted"]].values.tolist() == [["best", 20, 2048, False]]
    assert db.events(run_id)["detail"].tolist() == [{"signal": "SIGTERM", "nested": {"a": [1, 2]}}]

    runs = db.runs()
    assert runs[["id", "n_steps", "last_step", "n_epochs"]].values.tolist() == [[run_id, STEPS, STEPS, 2]]
    assert runs.loc[0, "duration_s"] >= 0 and runs.loc[0, "config"]["lr"] == 1e-3


def test_writer_cpu_time_counts_the_writes_of_its_own_thread(sqlite_url: str):
    with expdb.open(sqlite_url) as db:
        rec = db.recorder(flush_interval_s=3600)
        rec.start_run(make_info())
        assert rec.writer_cpu_s == 0.0          # nothing written yet
        opened = time.perf_counter()
        for step in range(1, STEPS + 1):
            rec.log_step(step, step_metrics(step))
        rec.log_epoch(0, {"train_loss": 4.0, "step": STEPS})     # flushes
        after_flush = rec.writer_cpu_s
        elapsed = time.perf_counter() - opened
        rec.finish("completed")
    assert 0.0 < after_flush <= elapsed         # CPU of one thread, never more than the wall time
    assert rec.writer_cpu_s >= after_flush


def test_resume_continues_the_row_and_replaces_later_history(db: expdb.ExperimentDB):
    first = db.recorder()
    run_id = first.start_run(make_info("r"))
    for step in range(1, 16):       # crashes after step 15; its last checkpoint was at step 10
        first.log_step(step, step_metrics(step))
        if step % 5 == 0:
            first.log_eval(step, 0, {"val_loss": 3.0 - step / 10, "val_bpb": 1.5 - step / 20})
    first.log_epoch(0, {"train_loss": 4.0, "step": 12})
    first.finish("interrupted", "SIGTERM")

    info = make_info("r", extra={"run_id": run_id, "resume_step": 10})
    second = db.recorder()
    assert second.start_run(info) == run_id
    assert db.run(run_id).status == "running"
    assert db.run(run_id).best_val_loss == pytest.approx(2.0)    # step 15's 1.5 was deleted
    assert db.run(run_id).best_val_bpb == pytest.approx(1.0)     # and its bpb with it: step 10's
    for step in range(11, 21):
        second.log_step(step, step_metrics(step))
    second.log_eval(20, 1, {"val_loss": 1.8, "val_bpb": 0.9})
    second.finish("completed")

    record = db.run(run_id)
    assert (record.status, record.status_reason, record.resume_count) == ("completed", None, 1)
    assert record.best_val_loss == pytest.approx(1.8) and record.best_step == 20 and record.best_val_bpb == 0.9
    assert db.steps(run_id)["step"].tolist() == list(range(1, 21))
    assert db.evals(run_id)["step"].tolist() == [5, 10, 20]
    assert db.epochs(run_id).empty                      # its step 12 was after the resume point
    events = db.events(run_id)
    assert events["kind"].tolist() == ["resume"] and events.loc[0, "detail"]["resume_step"] == 10
    assert len(db.runs()) == 1


def test_non_finite_values_round_trip(db: expdb.ExperimentDB):
    rec = db.recorder()
    run_id = rec.start_run(make_info())
    rec.log_step(1, {"loss": math.nan, "grad_norm": math.inf, "lr": -math.inf})
    rec.log_step(2, {"loss": 1.0})
    rec.log_eval(1, 0, {"val_loss": math.nan, "val_ppl": math.inf})
    rec.log_eval(2, 0, {"val_loss": math.inf, "val_ppl": math.inf})
    rec.log_epoch(0, {"train_loss": math.nan, "val_loss": -math.inf})
    rec.log_checkpoint("ck.pt", "emergency", 2, math.nan, 1, "x")
    rec.finish("failed", "nonfinite loss")

    steps = db.steps(run_id)
    assert math.isnan(steps.loc[0, "loss"]) and steps.loc[0, "grad_norm"] == math.inf
    assert steps.loc[0, "lr"] == -math.inf and steps.loc[1, "loss"] == 1.0
    evals = db.evals(run_id)
    assert math.isnan(evals.loc[0, "val_loss"]) and evals.loc[1, "val_loss"] == math.inf
    epochs = db.epochs(run_id)
    assert math.isnan(epochs.loc[0, "train_loss"]) and epochs.loc[0, "val_loss"] == -math.inf
    assert math.isnan(db.checkpoints(run_id).loc[0, "val_loss"])
    # NaN never becomes the best; +inf is a real (if useless) value.
    assert db.run(run_id).best_val_loss == math.inf and db.run(run_id).best_step == 2
    engine = create_engine(db.url)      # the raw convention, as SQL users see it
    with engine.connect() as conn:
        raw = conn.execute(text("SELECT loss, nan_columns FROM step_metrics ORDER BY step")).all()
    engine.dispose()
    assert [tuple(r) for r in raw] == [(None, "loss"), (1.0, None)]


def test_unknown_run_id_is_a_clear_error(db: expdb.ExperimentDB):
    with pytest.raises(expdb.UnknownRunError, match="no run with id 42"):
        db.run(42)
    with pytest.raises(expdb.UnknownRunError):
        db.steps(42)
    with pytest.raises(expdb.UnknownRunError):
        db.recorder().start_run(make_info(extra={"run_id": 42}))


def test_resuming_another_runs_id_is_refused(db: expdb.ExperimentDB):
    run_id = record_run(db, make_info("mine"))
    stranger = make_info("theirs", extra={"run_id": run_id, "resume_step": 5})    # e.g. an id from another file
    with pytest.raises(expdb.RunMismatchError, match="is 'mine'.*not 'theirs'.*left alone") as caught:
        db.recorder().start_run(stranger)
    assert isinstance(caught.value, LookupError)       # the trainer then starts a new run
    assert len(db.steps(run_id)) == STEPS and db.run(run_id).resume_count == 0


def test_newer_schema_is_refused(db_url: str):
    expdb.open(db_url).close()
    engine = create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE expdb_schema_version SET version = :v"), {"v": SCHEMA_VERSION + 1})
    with pytest.raises(expdb.SchemaTooNewError, match=rf"version {SCHEMA_VERSION + 1}.*Nothing was changed"):
        expdb.open(db_url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version FROM expdb_schema_version")).scalar() == SCHEMA_VERSION + 1
    engine.dispose()


def test_run_summary_view_reads_with_plain_pandas(db: expdb.ExperimentDB, db_url: str):
    run_id = record_run(db, make_info("summary"))
    df = pd.read_sql("select * from run_summary", db_url)
    row = df.iloc[0]
    assert (row["id"], row["name"], row["status"], row["n_steps"], row["n_epochs"]) == (
        run_id, "summary", "completed", STEPS, 2)
    assert row["best_val_loss"] == pytest.approx(0.5) and float(row["duration_s"]) >= 0


def test_study_frame_has_searched_params(db: expdb.ExperimentDB):
    for trial, lr in enumerate((1e-3, 3e-4)):
        record_run(db, make_info(f"t{trial}", config={"lr": lr}, study_name="search", trial_number=trial),
                   steps=range(1, 11))
    record_run(db, make_info("other"), steps=range(1, 11))
    study = db.study("search")
    assert study["trial_number"].tolist() == [0, 1]
    assert study["params_lr"].tolist() == [1e-3, 3e-4] and "params_n_layer" not in study
    assert study["best_val_loss"].tolist() == pytest.approx([1.0, 1.0])
    assert "params_n_layer" in db.study("search", all_params=True)
    assert db.study("no-such-study").empty


def test_same_trial_twice_is_refused(db: expdb.ExperimentDB):
    db.recorder("s", 0).start_run(make_info("a"))
    with pytest.raises(expdb.DuplicateRunError, match="trial 0 already has run 1"):
        db.recorder("s", 0).start_run(make_info("b"))


def test_repeated_step_keeps_the_later_value_and_statuses_are_checked(db: expdb.ExperimentDB):
    rec = db.recorder()
    run_id = rec.start_run(make_info())
    rec.log_step(1, {"loss": 2.0})
    rec.log_epoch(0, {"train_loss": 2.0})       # flushes step 1
    rec.log_step(1, {"loss": 1.0})              # the same step again (e.g. after an OOM retry)
    with pytest.raises(expdb.InvalidValueError, match="not one of"):
        rec.finish("exploded")
    rec.finish("completed")
    assert db.steps(run_id)["loss"].tolist() == [1.0]
    with pytest.raises(expdb.RecorderStateError):
        rec.log_step(2, {"loss": 1.0})


def test_rotated_checkpoint_is_flagged_deleted(db: expdb.ExperimentDB):
    rec = db.recorder()
    run_id = rec.start_run(make_info())
    rec.log_checkpoint("ck-10.pt", "periodic", 10, None, 1, "a")
    rec.log_checkpoint("ck-20.pt", "periodic", 20, None, 1, "b")
    rec.log_event("checkpoint_deleted", 20, {"path": "ck-10.pt"})
    rec.finish("completed")
    assert db.checkpoints(run_id)["deleted"].tolist() == [True, False]


# -- SQLite files -------------------------------------------------------------------------
def test_plain_path_creates_a_wal_database_with_foreign_keys(tmp_path: Path):
    path = tmp_path / "nested" / "dir" / "experiments.db"
    with expdb.open(path) as db:
        assert db.url == f"sqlite:///{path}"
        with db._reader.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1      # NORMAL
    with pytest.raises(expdb.DatabaseNotFoundError, match="no experiment database"):
        expdb.open(tmp_path / "missing.db", create=False)


@pytest.mark.parametrize("content, message", [
    (b"\x00\xffnot sqlite" + bytes(range(256)) * 8, "not modified.*new one"),
    (b"SQLite format 3\x00" + bytes(range(256)) * 8, "not an experiment database"),  # header only
])
def test_not_a_database_is_refused_and_left_untouched(tmp_path: Path, content: bytes, message: str):
    path = tmp_path / "experiments.db"
    path.write_bytes(content)
    before = path.read_bytes()
    with pytest.raises(expdb.NotADatabaseError, match=f"{path}.*{message}"):
        expdb.open(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["experiments.db"]    # no -wal, no -shm


def wait_until(condition, hang_bound_s: float = 60.0) -> None:
    """Poll until ``condition()``; the bound only turns a hang into a failure, it times nothing."""
    deadline = time.monotonic() + hang_bound_s
    while not condition():
        assert time.monotonic() < deadline, "the condition never became true"
        time.sleep(0.01)


def test_writer_keeps_every_row_while_another_process_holds_the_lock(sqlite_url: str):
    # A short busy timeout makes the writer fail and retry during the lock, the hard case.
    # The lock is held by this thread's own connection until the loop ends, so a log call that
    # waited for it could never return: the loop finishing is the proof, whatever the machine's speed.
    db = expdb.open(sqlite_url, busy_timeout_s=0.2)
    rec = db.recorder(flush_interval_s=0.05)
    run_id = rec.start_run(make_info())
    rec.log_step(0, step_metrics(0))
    rec.log_epoch(0, {"train_loss": 1.0, "step": 0})    # waits for its flush: step 0 is written before the lock
    blocker = sqlite3.connect(sqlite_path(sqlite_url), isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    steps = 300
    for step in range(1, steps + 1):
        rec.log_step(step, step_metrics(step))
        if step % 50 == 0:
            rec.log_eval(step, 0, {"val_loss": 1.0 / step})
        time.sleep(0.002)
    wait_until(lambda: rec._writer.last_error is not None)        # the writer met the lock and retries
    assert blocker.execute("SELECT COUNT(*) FROM step_metrics").fetchone()[0] == 1   # the rows wait in memory
    blocker.execute("COMMIT")
    blocker.close()
    rec.finish("completed")
    assert db.steps(run_id)["step"].tolist() == list(range(steps + 1))
    assert db.run(run_id).best_step == steps
    db.close()


def test_epoch_ends_and_checkpoints_do_not_wait_for_a_locked_database(sqlite_url: str):
    # The default busy timeout (30 s): the writer thread waits inside SQLite for the lock. A call
    # that waited with it would return after that timeout at the earliest (the lock is this thread's
    # until the calls return); each waits only its sync timeout, 0.2 s. The bound is the busy
    # timeout itself, a hundred times the expected wait: no machine is that slow, any regression is.
    db = expdb.open(sqlite_url)
    rec = db.recorder(flush_interval_s=0.05, sync_timeout_s=0.2)
    run_id = rec.start_run(make_info())
    blocker = sqlite3.connect(sqlite_path(sqlite_url), isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    started = time.monotonic()
    rec.log_step(1, step_metrics(1))
    rec.log_epoch(0, {"train_loss": 1.0, "step": 1})
    rec.log_checkpoint("ck.pt", "periodic", 1, None, 1, "a")
    rec.log_event("signal", 1, {"signal": "SIGTERM"})
    waited = time.monotonic() - started
    held_back = blocker.execute("SELECT COUNT(*) FROM epoch_metrics").fetchone()[0]
    blocker.execute("COMMIT")
    blocker.close()
    rec.finish("completed")
    assert held_back == 0                               # the calls returned with their rows unwritten
    assert waited < DEFAULT_BUSY_TIMEOUT_S, f"three flushes took {waited:.2f} s: they waited for the lock"
    assert len(db.steps(run_id)) == 1 and len(db.epochs(run_id)) == 1 and len(db.events(run_id)) == 1
    db.close()


def _write_runs(url: str, worker: int, runs: int, steps: int) -> None:
    """Child process body (module level so that spawn can import it)."""
    with expdb.open(url) as db:
        for i in range(runs):
            record_run(db, make_info(f"w{worker}-{i}"), steps=range(1, steps + 1),
                       recorder=db.recorder(flush_interval_s=0.01, batch_rows=50))


def test_two_processes_writing_one_file_lose_no_row(sqlite_url: str):
    ctx = multiprocessing.get_context("spawn")
    # Both start on a file that does not exist yet: schema creation races too.
    workers = [ctx.Process(target=_write_runs, args=(sqlite_url, w, 4, 150)) for w in range(2)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(timeout=120)
    assert [p.exitcode for p in workers] == [0, 0]
    with expdb.open(sqlite_url) as db:
        runs = db.runs()
        assert sorted(runs["name"]) == sorted(f"w{w}-{i}" for w in range(2) for i in range(4))
        assert runs["n_steps"].tolist() == [150] * 8 and (runs["status"] == "completed").all()
        assert len(db.epochs()) == 8 * 15 and len(db.events()) == 8


def test_optuna_storage_shares_the_file(sqlite_url: str):
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=sqlite_url, study_name="shared", direction="minimize")
    study.optimize(lambda trial: trial.suggest_float("x", -1, 1) ** 2, n_trials=3)
    with expdb.open(sqlite_url) as db:
        run_id = record_run(db, make_info("trial0", study_name="shared", trial_number=0), steps=range(1, 11))
        assert db.study("shared")["run_id"].tolist() == [run_id]
    again = optuna.load_study(study_name="shared", storage=sqlite_url)
    again.optimize(lambda trial: trial.suggest_float("x", -1, 1) ** 2, n_trials=1)
    assert len(again.trials) == 4
    with expdb.open(sqlite_url) as db:
        assert len(db.runs()) == 1


def test_optuna_can_join_an_existing_experiment_database(sqlite_url: str):
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with expdb.open(sqlite_url) as db:
        record_run(db, make_info(), steps=range(1, 11))
    study = optuna.create_study(storage=sqlite_url, study_name="later")
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    with expdb.open(sqlite_url) as db:
        assert len(db.runs()) == 1 and len(db.steps(1)) == 10


def test_foreign_tables_named_like_ours_are_refused(tmp_path: Path):
    path = tmp_path / "mlflow.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE runs (run_uuid TEXT)")
    conn.close()
    with pytest.raises(expdb.SchemaError, match="did not create .*runs"):
        expdb.open(path)


def test_recorders_in_threads_share_one_database(sqlite_url: str):
    with expdb.open(sqlite_url) as db:
        threads = [threading.Thread(target=record_run, args=(db, make_info(f"t{i}")),
                                    kwargs={"steps": range(1, 51)}) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert db.runs()["n_steps"].tolist() == [50, 50, 50]

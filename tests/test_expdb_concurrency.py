"""SQLite under concurrency, with real processes: several writers on one file, a writer
killed mid-batch, and a database locked by another process during a real training run."""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import expdb
from expdb import maintenance
from test_expdb import make_info

WRITERS, RUNS, STEPS = 4, 3, 1500


def _writer(path: str, worker: int) -> None:
    """Child process body: a few runs as the trainer logs them; any expdb warning is a failure."""
    warnings: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = warnings.append
    logging.getLogger("expdb").addHandler(handler)
    with expdb.open(path) as db:
        for i in range(RUNS):
            rec = db.recorder(f"study-{worker}", i, flush_interval_s=0.02)
            rec.start_run(make_info(f"w{worker}-r{i}"))
            for step in range(STEPS):
                rec.log_step(step, {"loss": 1.0 / (step + 1), "lr": 0.001, "grad_norm": 1.0})
                if step % 100 == 99:
                    rec.log_eval(step, step // 500, {"val_loss": 1.0 / (step + 1)})
                if step % 500 == 499:
                    rec.log_epoch(step // 500, {"train_loss": 1.0, "step": step})
                    rec.log_checkpoint(f"ck/{worker}/{i}/{step}", "periodic", step, 1.0, 10, "0" * 64)
                    rec.log_event("oom", step, {"micro_batch": 4})
            rec.finish("completed")
    sys.exit(3 if warnings else 0)


@pytest.mark.slow
def test_four_processes_write_one_new_file_at_once(tmp_path: Path):
    path = str(tmp_path / "experiments.db")
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_writer, args=(path, w)) for w in range(WRITERS)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(timeout=300)
    assert [p.exitcode for p in workers] == [0] * WRITERS
    with expdb.open(path) as db:
        runs = db.runs()
        assert sorted(runs["name"]) == sorted(f"w{w}-r{i}" for w in range(WRITERS) for i in range(RUNS))
        assert runs["n_steps"].tolist() == [STEPS] * WRITERS * RUNS and (runs["status"] == "completed").all()
        assert runs["best_step"].tolist() == [STEPS - 1] * WRITERS * RUNS
        assert len(db.epochs()) == WRITERS * RUNS * 3 and len(db.events()) == WRITERS * RUNS * 3
        assert len(db.checkpoints()) == WRITERS * RUNS * 3
        for run_id in runs["id"]:
            assert db.steps(run_id)["step"].tolist() == list(range(STEPS))
        assert maintenance.check(db, files=False).ok
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    conn.close()


_KILLED_WRITER = textwrap.dedent("""
    import sys
    import expdb
    from test_expdb import make_info
    db = expdb.open(sys.argv[1])
    rec = db.recorder(flush_interval_s=0.02, batch_rows=2000, sync_timeout_s=30)
    rec.start_run(make_info("doomed"))
    step = 0
    while True:
        rec.log_step(step, {"loss": 1.0, "lr": 0.01, "grad_norm": 2.0, "epoch": step // 1000})
        if step % 1000 == 999:
            rec.log_epoch(step // 1000, {"train_loss": 1.0, "step": step})   # a flush: durable now
            print(step, flush=True)
        step += 1
""")


def test_a_writer_killed_mid_batch_keeps_every_row_up_to_its_last_flush(tmp_path: Path):
    path = tmp_path / "experiments.db"
    child = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(path)], stdout=subprocess.PIPE,
                             text=True, cwd=Path(__file__).parent)
    flushed = [int(child.stdout.readline()) for _ in range(3)]
    time.sleep(random.uniform(0.0, 0.05))        # somewhere inside the writer's next batches
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    child.stdout.close()
    assert child.returncode == -signal.SIGKILL

    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    conn.close()
    with expdb.open(path) as db:
        steps = db.steps(1)["step"].tolist()
        assert steps == list(range(len(steps)))              # a prefix of what was logged, no hole
        assert len(steps) > flushed[-1]                      # everything up to the last flush
        assert db.epochs(1)["step"].tolist()[:3] == flushed
        assert db.run(1).status == "running"                 # it never finished
        assert maintenance.check(db, files=False).ok         # the rollups agree with the rows
        resumed = db.recorder()                              # and the run can go on
        resumed.start_run(make_info("doomed", extra={"run_id": 1, "resume_step": flushed[-1]}))
        resumed.log_step(flushed[-1] + 1, {"loss": 0.5})
        resumed.finish("completed")
        assert len(db.steps(1)) == flushed[-1] + 2


_BLOCKER = textwrap.dedent("""
    import json, sqlite3, sys, time
    conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=60)
    while conn.execute("SELECT COUNT(*) FROM step_metrics").fetchone()[0] < 5:   # training is under way
        time.sleep(0.01)
    conn.execute("BEGIN IMMEDIATE")
    started, rows = time.time(), conn.execute("SELECT COUNT(*) FROM step_metrics").fetchone()[0]
    time.sleep(float(sys.argv[2]))
    ended = time.time()
    conn.execute("COMMIT")
    print(json.dumps([started, ended, rows]), flush=True)
""")


class TimedRecorder:
    """Forwards to a DBRecorder and times every call the training loop makes."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __getattr__(self, name):
        method = getattr(self.inner, name)

        def timed(*args, **kwargs):
            t0 = time.time()
            try:
                return method(*args, **kwargs)
            finally:
                self.calls.append((name, t0, time.time()))
        return timed


@pytest.mark.slow
def test_training_goes_on_while_another_process_locks_the_database_for_5_s(tmp_path: Path, tiny_cfg, tiny_data):
    from trainer.run import train

    path = tmp_path / "experiments.db"
    db = expdb.open(path)
    blocker = subprocess.Popen([sys.executable, "-c", _BLOCKER, str(path), "5"], stdout=subprocess.PIPE, text=True)
    recorder = TimedRecorder(db.recorder())
    result = train(tiny_cfg.replace(epochs=4), recorder, data=tiny_data, log=lambda *_: None)
    locked_from, locked_to, rows_in_db = json.loads(blocker.communicate(timeout=60)[0])

    steps = [t0 for name, t0, _ in recorder.calls if name == "log_step"]
    during = [t for t in steps if locked_from < t < locked_to]
    assert len(during) > 10, "training should have gone on during the lock"
    # Waiting for the lock would take seconds; a step on a busy machine takes well under 2.5 s.
    gaps = [b - a for a, b in zip(steps, steps[1:]) if locked_from - 1 < a < locked_to]
    assert max(gaps) < 2.5, f"a step took {max(gaps):.2f} s during the lock"
    calls = {name: max(t1 - t0 for n, t0, t1 in recorder.calls if n == name) for name, _, _ in recorder.calls}
    slow = {name: round(s, 2) for name, s in calls.items() if s > 1.0 and name not in ("start_run", "finish")}
    assert slow == {}, f"recorder calls waited for the lock: {slow}"
    logged_before_release = sum(t < locked_to for t in steps)
    assert rows_in_db < logged_before_release          # rows logged meanwhile were held back...
    with db:                                           # ...and none was lost
        assert result.status == "completed" and len(db.steps(result.run_id)) == result.steps == len(steps)
        assert len(db.epochs(result.run_id)) == 4 and db.run(result.run_id).status == "completed"
        assert maintenance.check(db).ok                # the trainer's own checkpoints, sha256 and all

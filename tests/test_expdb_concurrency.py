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
    import json, sqlite3, sys
    conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=60)
    count = lambda: conn.execute("SELECT COUNT(*) FROM step_metrics").fetchone()[0]
    if sys.stdin.readline().strip() != "lock":          # the test died: nothing to do
        sys.exit(1)
    conn.execute("BEGIN IMMEDIATE")
    print(json.dumps(count()), flush=True)
    if sys.stdin.readline().strip() != "release":
        sys.exit(1)                                     # the lock ends with the process
    rows = count()
    conn.execute("COMMIT")
    print(json.dumps(rows), flush=True)
""")


class LockingRecorder:
    """Forwards to a DBRecorder; has another process lock the database for writes when the
    trainer logs step ``lock_at`` and release it at the first step from ``release_at`` on
    after a checkpoint was reported under the lock, and notes which recorder calls the trainer
    made while the lock was held. Steps and calls, not seconds, decide when: a checkpoint is
    written in the background and reported at the step after its write ends, which comes
    sooner in steps on a slow machine than on a fast one."""

    def __init__(self, inner, blocker: subprocess.Popen, lock_at: int, release_at: int):
        self.inner, self.blocker, self.lock_at, self.release_at = inner, blocker, lock_at, release_at
        self.locked = False
        self.during_lock: list[tuple[str, int | None]] = []
        self.rows_at_lock = self.rows_at_release = None
        self.lock_seconds = 0.0

    def _saw(self, call: str) -> bool:
        return any(name == call for name, _ in self.during_lock)

    def _tell(self, command: str) -> int:
        self.blocker.stdin.write(command + "\n")
        self.blocker.stdin.flush()
        answer = self.blocker.stdout.readline()
        assert answer, f"the blocker process ended instead of answering {command!r}"
        return json.loads(answer)

    def __getattr__(self, name):
        method = getattr(self.inner, name)

        def forwarded(*args, **kwargs):
            step = args[0] if name == "log_step" else None
            if step == self.lock_at:
                self.rows_at_lock, self.locked, self._locked_from = self._tell("lock"), True, time.monotonic()
            if self.locked:
                self.during_lock.append((name, step))
            result = method(*args, **kwargs)
            if self.locked and step is not None and step >= self.release_at and self._saw("log_checkpoint"):
                self.lock_seconds = time.monotonic() - self._locked_from
                self.rows_at_release, self.locked = self._tell("release"), False
            return result
        return forwarded


@pytest.mark.slow
def test_training_goes_on_while_another_process_locks_the_database(tmp_path: Path, tiny_cfg, tiny_data):
    from expdb.engine import DEFAULT_BUSY_TIMEOUT_S
    from trainer.run import train

    path = tmp_path / "experiments.db"
    db = expdb.open(path)
    blocker = subprocess.Popen([sys.executable, "-c", _BLOCKER, str(path)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    # 30 steps an epoch, an evaluation every 20: the lock spans steps 10 to 45 or later (until
    # the epoch end's checkpoint is reported), so an evaluation, an epoch end and its checkpoint
    # all happen while another process holds the database.
    recorder = LockingRecorder(db.recorder(), blocker, lock_at=10, release_at=45)
    try:
        result = train(tiny_cfg.replace(epochs=4), recorder, data=tiny_data, log=lambda *_: None)
    finally:
        blocker.stdin.close()
        blocker.wait(timeout=60)

    # The trainer went on through the lock: a step, evaluation, epoch end or checkpoint that
    # waited for it would have waited SQLite's whole busy timeout (30 s) and then failed.
    called = {name for name, _ in recorder.during_lock}
    assert {"log_step", "log_eval", "log_epoch", "log_checkpoint"} <= called, called
    assert [s for n, s in recorder.during_lock if n == "log_step"] == list(range(10, 46))
    assert recorder.lock_seconds < DEFAULT_BUSY_TIMEOUT_S      # a bound from the timeout, not the machine
    assert recorder.rows_at_release == recorder.rows_at_lock < 10    # rows logged meanwhile were held back...
    with db:                                                         # ...and none was lost
        assert result.status == "completed" and len(db.steps(result.run_id)) == result.steps == 120
        assert len(db.epochs(result.run_id)) == 4 and db.run(result.run_id).status == "completed"
        assert maintenance.check(db).ok                # the trainer's own checkpoints, sha256 and all


def test_a_reader_holding_a_read_transaction_never_blocks_the_writer(tmp_path: Path):
    """WAL: a reader in the middle of a read (a dashboard's query, a notebook's pandas cell)
    keeps its snapshot while the writer commits; in a rollback journal the writer would wait
    for the reader's lock and, past the busy timeout, say "database is locked"."""
    path = tmp_path / "experiments.db"
    with expdb.open(path, busy_timeout_s=0.2) as db:
        rec = db.recorder(flush_interval_s=0.02)
        run_id = rec.start_run(make_info("read-while-writing"))
        reader = sqlite3.connect(path, timeout=0, isolation_level=None)
        assert reader.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        reader.execute("BEGIN")
        before = reader.execute("SELECT count(*) FROM step_metrics").fetchone()[0]
        for step in range(1000):
            rec.log_step(step, {"loss": 1.0})
        assert rec._writer.flush(30)        # written while the reader's transaction is open
        assert reader.execute("SELECT count(*) FROM step_metrics").fetchone()[0] == before == 0
        reader.execute("COMMIT")
        assert reader.execute("SELECT count(*) FROM step_metrics").fetchone()[0] == 1000
        reader.close()
        rec.finish("completed")
        assert rec.unwritten_rows == 0 and len(db.steps(run_id)) == 1000

"""Readers never stop a writer: while a study of two worker processes trains on one SQLite
file, real readers poll it (a pandas ``read_sql`` loop, ``python -m dashboards --watch``, and
optuna-dashboard's web API when it is installed); the study completes every trial, none
fails, every step row is there, and no output anywhere says "database is locked".

The file is in WAL mode (expdb sets it when it opens the database), so a reader reads the
last committed rows without a lock that a writer waits for; each reader's loop is bounded
and stops by itself once the study has all its trials.
"""
from __future__ import annotations

import importlib.util
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest

from test_study import command, env, study_dir  # noqa: F401 - the fixture

TRIALS = 4
LOCKED = "database is locked"

# A user's notebook cell, in a loop: pandas through SQLAlchemy, plus optuna-dashboard's API.
PANDAS_READER = textwrap.dedent("""
    import json, sys, time, urllib.request
    import pandas as pd
    from sqlalchemy import create_engine

    url, trials, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    engine = create_engine(url)
    reads = api = 0
    for _ in range(20000):                          # bounded; it stops once the study is done
        runs = pd.read_sql("select r.id, r.status, count(s.step) as steps from runs r "
                           "left join step_metrics s on s.run_id = r.id group by r.id", engine)
        done = pd.read_sql("select count(*) as n from trials where state in ('COMPLETE', 'PRUNED', 'FAIL')",
                           engine).n[0]
        reads += 1
        if port:
            studies = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=60))
            for s in studies["study_summaries"]:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{s['study_id']}", timeout=60).read()
            api += 1
        if done >= trials:
            break
        time.sleep(0.05)
    print(f"pandas reader: {reads} reads, {api} optuna-dashboard polls, last {runs.to_dict('records')}")
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def running_runs(db: Path) -> list[int]:
    if not db.exists():
        return []
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=60)
    try:
        return [r[0] for r in conn.execute("select id from runs where status = 'running' order by id")]
    except sqlite3.OperationalError:     # no tables yet
        return []
    finally:
        conn.close()


def optuna_dashboard(url: str, log: Path) -> tuple[subprocess.Popen | None, int]:
    if importlib.util.find_spec("optuna_dashboard") is None:
        return None, 0
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", "from optuna_dashboard._cli import main; main()", url,
                               "--host", "127.0.0.1", "--port", str(port)],
                              stdout=log.open("w"), stderr=subprocess.STDOUT)
    for _ in range(600):        # until it answers (bounded)
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, port
        except OSError:
            assert server.poll() is None, log.read_text()
            time.sleep(0.1)
    pytest.fail("optuna-dashboard did not start listening")


@pytest.mark.slow
def test_readers_polling_a_live_study_cost_it_no_step_and_no_trial(study_dir):  # noqa: F811
    db, url = study_dir / "experiments.db", f"sqlite:///{study_dir / 'experiments.db'}"
    flags = ("--trials", str(TRIALS), "--pruner", "none", "--progress", "false")
    workers = [subprocess.Popen(command(*flags), cwd=study_dir, env=env(threads=1), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    while not running_runs(db):         # the readers start once the study is writing
        assert all(w.poll() is None for w in workers), [w.stdout.read()[-3000:] for w in workers]
        time.sleep(0.1)
    server, port = optuna_dashboard(url, study_dir / "optuna-dashboard.log")
    pandas_reader = subprocess.Popen([sys.executable, "-c", PANDAS_READER, url, str(TRIALS), str(port)],
                                     cwd=study_dir, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
    watched, outputs = [], []
    while any(w.poll() is None for w in workers):   # one watcher at a time, on each run that trains
        fresh = [r for r in running_runs(db) if r not in watched]
        if fresh:
            watched.append(fresh[0])
            watcher = subprocess.run(
                [sys.executable, "-m", "dashboards", "--db", "experiments.db", "--run", str(fresh[0]),
                 "--out", f"run{fresh[0]}.png", "--watch", "0.2", "--watch-iterations", "500"],
                cwd=study_dir, env=env(), capture_output=True, text=True, timeout=900)
            outputs.append(watcher.stdout + watcher.stderr)
            assert watcher.returncode == 0, outputs[-1][-3000:]
        time.sleep(0.1)
    outputs += [w.communicate(timeout=900)[0] for w in workers]
    outputs.append(pandas_reader.communicate(timeout=900)[0])
    if server is not None:
        server.terminate()
        server.wait(timeout=60)
        outputs.append((study_dir / "optuna-dashboard.log").read_text())
    assert [w.returncode for w in workers] == [0, 0], outputs[-4:]
    assert pandas_reader.returncode == 0, outputs[-2][-3000:]
    assert not [o for o in outputs if LOCKED in o], [o[-2000:] for o in outputs if LOCKED in o]
    reader_line = next(line for line in outputs[-1 if server is None else -2].splitlines()
                       if line.startswith("pandas reader: "))
    reads, polls = (int(word) for word in reader_line.split()[2:5:2])
    print(reader_line, f"; dashboards --watch followed runs {watched}")
    assert watched and reads >= 10 and (server is None or polls >= 1), reader_line   # they did overlap

    trials = optuna.load_study(study_name="t", storage=url).get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * TRIALS
    runs = pd.read_sql("select id, status from runs", url)
    assert list(runs.status) == ["completed"] * TRIALS
    for run_id in runs.id:      # every step of every run, once, up to the last epoch's step
        steps = sorted(pd.read_sql(f"select step from step_metrics where run_id = {run_id}", url).step)
        last = pd.read_sql(f"select max(step) as s from epoch_metrics where run_id = {run_id}", url).s[0]
        assert steps == list(range(steps[0], last + 1)) and steps[0] in (0, 1), (run_id, steps[:3], last)

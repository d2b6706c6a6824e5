"""The study lock orders workers across processes: no two hold it at once."""
import multiprocessing as mp
import time

import pytest

from studies.lock import StudyLock


def _hold(url, name, log_path, rounds):
    lock = StudyLock(url, name)
    for _ in range(rounds):
        with lock.held():
            with open(log_path, "a") as f:
                f.write("in\n")
            time.sleep(0.02)
            with open(log_path, "a") as f:
                f.write("out\n")
    lock.close()


def _contend(url, tmp_path, name="s"):
    log = tmp_path / "log.txt"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_hold, args=(url, name, str(log), 5)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    return log.read_text().split()


def test_sqlite_lock_excludes_other_processes(tmp_path):
    lines = _contend(f"sqlite:///{tmp_path / 'experiments.db'}", tmp_path)
    assert lines == ["in", "out"] * 15  # never two "in" in a row


def test_locks_of_different_studies_are_independent(tmp_path):
    url = f"sqlite:///{tmp_path / 'experiments.db'}"
    a, b = StudyLock(url, "a"), StudyLock(url, "b")
    with a.held():
        ctx = mp.get_context("spawn")
        p = ctx.Process(target=_hold, args=(url, "b", str(tmp_path / "b.txt"), 1))
        p.start()
        p.join(120)  # a bound on a hang (if "b" waited for "a"), not on how fast a process starts
        assert p.exitcode == 0
    a.close()
    b.close()


@pytest.mark.postgres
def test_postgres_advisory_lock_excludes_other_processes(postgres_url, tmp_path):
    lines = _contend(postgres_url, tmp_path)
    assert lines == ["in", "out"] * 15

"""python -m trainer.pack and python -m trainer --continue-from: one run over two sessions,
the second reading the first one's pack in place (moved to another absolute path)."""
import shutil
import subprocess
import sys

import pandas as pd
import pytest

from test_sessions import SESSION_STUDY, tree_hashes
from test_study import env


def trainer(cwd, *flags, expect=0):
    result = subprocess.run([sys.executable, "-m", "trainer", "--config", "tiny.yaml", "--out", "runs/r", *flags],
                            cwd=cwd, env={**env(), "TRAINER_SIMULATED_STEP_S": "10"}, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == expect, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_a_run_continues_from_its_moved_pack(tmp_path):
    from trainer.errors import EXIT_TIME_BUDGET

    first, second = tmp_path / "one", tmp_path / "two"
    for folder in (first, second):
        folder.mkdir()
        (folder / "tiny.yaml").write_text(SESSION_STUDY)
    trainer(first, "--time-budget", "70s", expect=EXIT_TIME_BUDGET)
    packed = subprocess.run([sys.executable, "-m", "trainer.pack", "--out", "runs/r"], cwd=first, env=env(),
                            capture_output=True, text=True, timeout=300)
    assert packed.returncode == 0 and "session pack:" in packed.stdout, packed.stderr
    pack = tmp_path / "input" / "pack"
    pack.parent.mkdir()
    shutil.move(str(first / "session-pack"), pack)
    shutil.rmtree(first)
    check = subprocess.run([sys.executable, "-m", "expdb", "--db", str(pack / "experiments.db"), "check"],
                           cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr
    before = tree_hashes(pack)
    trainer(second, "--continue-from", str(pack))
    assert tree_hashes(pack) == before
    url = f"sqlite:///{second / 'experiments.db'}"
    runs = pd.read_sql("select id, status, resume_count from runs", url)
    assert list(runs.status) == ["completed"] and list(runs.resume_count) == [1]
    resume = pd.read_sql("select step from events where kind = 'resume'", url).step
    assert len(resume) == 1 and resume[0] > 0
    steps = pd.read_sql("select step from step_metrics order by step", url).step
    assert list(steps) == list(range(1, 13))

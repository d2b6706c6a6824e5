"""A study over Kaggle-like sessions: session 1 stops on its time budget and writes a pack;
session 2 continues from the pack, moved and read in place; bad inputs are refused first.

Time budgets run on the simulated clock (TRAINER_SIMULATED_STEP_S): every optimizer step
counts 10 s, so the budget stops session 1 at the same step on any machine.
"""
import hashlib
import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest

from test_study import TINY_SPACE, TINY_STUDY, command, env

SESSION_STUDY = TINY_STUDY.replace("epochs: 2", "epochs: 1\nmax_steps: 12").replace("eval_every: 10", "eval_every: 3")


def tree_hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def working_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "tiny.yaml").write_text(SESSION_STUDY)
    (path / "space.yaml").write_text(TINY_SPACE)
    return path


def run(cwd: Path, *flags, expect=0, step_s="10"):
    result = subprocess.run(command(*flags, "--pruner", "none", "--progress", "false"), cwd=cwd,
                            env={**env(), "TRAINER_SIMULATED_STEP_S": step_s}, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == expect, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def trials_of(folder: Path) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name="t", storage=f"sqlite:///{folder / 'experiments.db'}").trials


@pytest.mark.slow
def test_two_sessions_continue_from_a_moved_pack_read_in_place(tmp_path):
    first = working_folder(tmp_path / "session-1")
    out = run(first, "--trials", "3", "--time-budget", "70s").stdout      # 12 steps x 10 s do not fit
    assert "session pack:" in out and (first / "session-pack.tar").is_file()
    stopped = trials_of(first)
    assert [t.state for t in stopped] == [optuna.trial.TrialState.RUNNING]
    # The pack moves to another absolute path (a Kaggle dataset under /kaggle/input, say).
    pack = tmp_path / "input" / "previous-session"
    pack.parent.mkdir()
    shutil.move(str(first / "session-pack"), pack)
    shutil.rmtree(first)             # nothing of session 1 is left but the pack
    check = subprocess.run([sys.executable, "-m", "expdb", "--db", str(pack / "experiments.db"), "check"],
                           cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr
    meta = json.loads((pack / "pack.json").read_text())
    assert meta["study"]["unfinished"] == [0] and "--continue-from" in meta["next_command"]
    before = tree_hashes(pack)
    pack.chmod(0o555)                # read-only (as root this stops nothing: the hashes are the test)

    second = working_folder(tmp_path / "session-2")
    run(second, "--trials", "3", "--continue-from", str(pack))
    assert tree_hashes(pack) == before
    url = f"sqlite:///{second / 'experiments.db'}"
    trials = trials_of(second)
    assert len(trials) == 3 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 3       # no configuration twice
    assert trials[0].params == stopped[0].params
    runs = pd.read_sql("select id, trial_number, resume_count from runs order by trial_number", url)
    assert list(runs.trial_number) == [0, 1, 2]                              # one run row per trial
    resumed = runs.id[0]
    cut_at = int(meta["checkpoints"][0].rsplit("-", 1)[1])
    resumes = pd.read_sql(f"select step from events where kind = 'resume' and run_id = {resumed}", url)
    assert list(resumes.step) == [cut_at] and cut_at > 0                      # not reset to 0
    steps = pd.read_sql(f"select step from step_metrics where run_id = {resumed} order by step", url).step
    assert list(steps) == list(range(1, 13))
    check = subprocess.run([sys.executable, "-m", "expdb", "--db", "experiments.db", "check"], cwd=second,
                           env=env(), capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr
    pack.chmod(0o755)


# -- bad inputs: exit 2, one line naming the flag and the folder, nothing written ---------------
def _pack(folder: Path, study_name="t", schema=None) -> Path:
    """A real pack: a real experiment database (and Optuna study) through trainer.pack."""
    import expdb
    from trainer.pack import finish_pack, snapshot_database, start_pack

    work = folder.parent / f"{folder.name}-work"
    work.mkdir(parents=True)
    expdb.open(work / "experiments.db").close()
    optuna.create_study(study_name=study_name, storage=f"sqlite:///{work / 'experiments.db'}")
    if schema is not None:
        with sqlite3.connect(work / "experiments.db") as conn:
            conn.execute("UPDATE expdb_schema_version SET version = ?", (schema,))
    staging = start_pack(work)
    snapshot_database(work / "experiments.db", staging / "experiments.db")
    result = finish_pack(staging, work, {"kind": "study", "study": {"name": study_name}})
    shutil.move(str(result.folder), folder)
    return folder


def _damaged(folder: Path) -> Path:
    _pack(folder)
    with open(folder / "experiments.db", "ab") as fh:
        fh.write(b"\0")
    return folder


BAD = {
    "empty": (lambda p: p.mkdir(parents=True) or p, "no experiments.db and no checkpoints"),
    "damaged": (_damaged, "does not match its sha256"),
    "other-study": (lambda p: _pack(p, study_name="other"), "a pack of study 'other', not 't'"),
    "newer": (lambda p: _pack(p, schema=99), "newer"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_continue_from_is_refused_before_anything_is_written(tmp_path, case):
    make, message = BAD[case]
    folder = make(tmp_path / "inputs" / case)
    work = working_folder(tmp_path / "work")
    before_input, before_work = tree_hashes(folder), tree_hashes(work)
    result = subprocess.run(command("--trials", "1", "--continue-from", str(folder)), cwd=work, env=env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert f"--continue-from {str(folder)!r}" in lines[0] and message in lines[0], lines[0]
    assert tree_hashes(work) == before_work and sorted(p.name for p in work.iterdir()) == ["space.yaml", "tiny.yaml"]
    assert tree_hashes(folder) == before_input

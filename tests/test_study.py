"""The main job end to end: a real Optuna study of trainer runs in one SQLite file."""
import os
import subprocess
import sys

import optuna
import pandas as pd
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_STUDY = """\
subset: 0.03
vocab_size: 512
block_size: 64
epochs: 2
eval_every: 10
eval_batches: 4
progress: false
"""


def search(cwd, *flags):
    env = {**os.environ, "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "studies.search", "--config", "tiny.yaml", "--study-name", "t", *flags]
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


@pytest.mark.slow
def test_study_records_linked_runs_and_continues(tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY_STUDY)
    out = search(tmp_path, "--trials", "4", "--seed", "1")
    assert "best trial" in out and "unigram entropy" in out

    url = f"sqlite:///{tmp_path / 'experiments.db'}"
    runs = pd.read_sql("select * from runs order by trial_number", url)
    study = optuna.load_study(study_name="t", storage=url)
    trials = study.get_trials()
    assert len(runs) == len(trials) == 4
    # linked both ways: trial number on the run, run id on the trial
    assert sorted(runs.trial_number) == [t.number for t in trials]
    assert {t.user_attrs["run_id"] for t in trials} == set(runs.id)
    states = {t.number: t.state.name.lower() for t in trials}
    assert {r.trial_number: r.status for r in runs.itertuples()} == {
        n: {"complete": "completed"}.get(s, s) for n, s in states.items()}
    # every run has epoch metrics and a recorded checkpoint that exists on disk
    epochs = pd.read_sql("select run_id, count(*) as n from epoch_metrics group by run_id", url)
    assert set(epochs.run_id) == set(runs.id)
    ckpts = pd.read_sql("select run_id, path, kind from checkpoints", url)
    assert set(ckpts.run_id) == set(runs.id) and all(os.path.isdir(p) for p in ckpts.path)
    assert (tmp_path / "runs/t/best_dashboard.png").stat().st_size > 10_000

    # the same command again: the study already has 4 finished trials, so nothing runs
    search(tmp_path, "--trials", "4", "--seed", "1")
    assert len(optuna.load_study(study_name="t", storage=url).trials) == 4
    # asking for 5 adds exactly one
    search(tmp_path, "--trials", "5", "--seed", "1")
    assert len(optuna.load_study(study_name="t", storage=url).trials) == 5
    assert len(pd.read_sql("select id from runs", url)) == 5

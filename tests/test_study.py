"""The main job end to end: real Optuna studies of trainer runs, killed, resumed, shared."""
import datetime as dt
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest

from trainer.clock import SIMULATED_STEP_ENV, SimulatedTime, wall_clock
from trainer.config import TrainConfig, load_config_file

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
TINY_SPACE = """\
lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}
n_layer: {type: int, low: 1, high: 2}
n_embd: {type: categorical, choices: [32, 48]}
"""


def command(*flags, db="experiments.db"):
    return [sys.executable, "-m", "studies.search", "--config", "tiny.yaml", "--space", "space.yaml",
            "--study-name", "t", "--db", db, *flags]


def env(threads=None):
    extra = {"OMP_NUM_THREADS": str(threads)} if threads else {}
    return {**os.environ, "PYTHONPATH": ROOT, **extra}


def search(cwd, *flags, db="experiments.db", expect=0):
    result = subprocess.run(command(*flags, db=db), cwd=cwd, env=env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == expect, result.stdout[-3000:] + result.stderr[-4000:]
    return result.stdout


@pytest.fixture
def study_dir(tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY_STUDY)
    (tmp_path / "space.yaml").write_text(TINY_SPACE)
    return tmp_path


def url_of(study_dir):
    return f"sqlite:///{study_dir / 'experiments.db'}"


@pytest.mark.slow
def test_study_records_linked_runs_and_continues(study_dir):
    out = search(study_dir, "--trials", "4", "--seed", "1")
    assert "best trial" in out and "unigram entropy" in out
    url = url_of(study_dir)
    runs = pd.read_sql("select * from runs order by trial_number", url)
    trials = optuna.load_study(study_name="t", storage=url).get_trials()
    assert len(runs) == len(trials) == 4
    # linked both ways: trial number on the run, run id on the trial
    assert sorted(runs.trial_number) == [t.number for t in trials]
    assert {t.user_attrs["run_id"] for t in trials} == set(runs.id)
    states = {t.number: t.state.name.lower() for t in trials}
    assert {r.trial_number: r.status for r in runs.itertuples()} == {
        n: {"complete": "completed"}.get(s, s) for n, s in states.items()}
    # every run has epoch metrics and recorded checkpoints
    epochs = pd.read_sql("select distinct run_id from epoch_metrics", url)
    assert set(epochs.run_id) == set(runs.id)
    ckpts = pd.read_sql("select run_id, path, kind, deleted from checkpoints", url)
    assert set(ckpts.run_id) == set(runs.id)
    # stored relative to the database's folder (expdb.paths), resolved from there
    assert all(os.path.isdir(study_dir / p) for p in ckpts[ckpts.deleted == 0].path)
    assert (study_dir / "runs/t/best_dashboard.png").stat().st_size > 10_000
    # the report: top trials, best parameters, and a config the trainer accepts as --config
    report = subprocess.run([sys.executable, "-m", "studies.report", "--study", "t"], cwd=study_dir, env=env(),
                            capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stdout[-2000:] + report.stderr[-2000:]
    assert "best trial" in report.stdout and "parameter importances" in report.stdout
    best = optuna.load_study(study_name="t", storage=url).best_trial
    saved = load_config_file(study_dir / "runs/t/best_config.yaml")
    again = TrainConfig.from_dict(saved).check()
    assert again.lr == pytest.approx(best.params["lr"]) and again.n_layer == best.params["n_layer"]
    assert again.resume == "" and again.out_dir == "runs/best"
    assert (study_dir / "runs/t/report.html").stat().st_size > 1_000
    # the same command again: the study already has 4 finished trials, so nothing runs
    search(study_dir, "--trials", "4", "--seed", "1")
    assert len(optuna.load_study(study_name="t", storage=url).trials) == 4
    # asking for 5 adds exactly one
    search(study_dir, "--trials", "5", "--seed", "1")
    assert len(optuna.load_study(study_name="t", storage=url).trials) == 5
    assert len(pd.read_sql("select id from runs", url)) == 5


@pytest.mark.slow
def test_a_study_killed_at_random_moments_ends_with_exactly_n_trials(study_dir):
    """SIGKILL at random moments, restart, until the study says it is done."""
    rng = random.Random(7)
    kills = 0
    for attempt in range(4):
        proc = subprocess.Popen(command("--trials", "4", "--seed", "2", "--progress", "false"), cwd=study_dir,
                                env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        # The first kill at a random moment of start-up; later ones a random moment into training,
        # once this invocation has written a new checkpoint (so there is something to continue).
        if attempt == 0:
            time.sleep(rng.uniform(0.5, 3))
        else:
            _wait_for_new_checkpoint(study_dir, proc, timeout=120)
            time.sleep(rng.uniform(0, 2))
        if proc.poll() is not None:
            assert proc.returncode == 0, proc.stderr.read()[-3000:]
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    assert kills >= 2, "the test should have interrupted the study"
    search(study_dir, "--trials", "4", "--seed", "2")  # the last restart runs to the end
    url = url_of(study_dir)
    trials = optuna.load_study(study_name="t", storage=url).get_trials()
    assert len(trials) == 4 and all(t.state.is_finished() for t in trials)
    runs = pd.read_sql("select id, trial_number, status, resume_count from runs", url)
    assert sorted(runs.trial_number) == [0, 1, 2, 3]  # one run row per trial, never a second
    resumes = pd.read_sql("select run_id, step from events where kind = 'resume'", url)
    # a continued trial resumed from its checkpoint's step, not from 0, at least once
    assert (resumes.step > 0).any(), resumes
    # and its step history is one continuous sequence: every step once
    for run_id in runs[runs.resume_count > 0].id:
        steps = pd.read_sql(f"select step from step_metrics where run_id = {run_id} order by step", url).step
        assert list(steps) == list(range(1, len(steps) + 1)), run_id


def _wait_for_new_checkpoint(study_dir, proc, timeout):
    def newest():
        stamps = [p.stat().st_mtime for p in study_dir.glob("runs/t/trial-*/checkpoints/step-*")]
        return max(stamps, default=0.0)
    before, deadline = newest(), time.monotonic() + timeout
    while newest() <= before and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)


def _workers(study_dir, n, flags, db):
    # One thread each: several processes spinning on all cores' OpenMP threads crawl.
    procs = [subprocess.Popen(command(*flags, db=db), cwd=study_dir, env=env(threads=1), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(n)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out[-2000:] + err[-3000:]


def _check_shared_study(url, n_trials):
    trials = optuna.load_study(study_name="t", storage=url).get_trials()
    assert len(trials) == n_trials
    assert {t.state for t in trials} <= {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}
    runs = pd.read_sql("select id, trial_number, status from runs", url)
    assert sorted(runs.trial_number) == list(range(n_trials))
    assert set(runs.status) <= {"completed", "pruned"}
    # one command, several workers: each trial's sampler is seeded by its number, so no two alike
    assert len({tuple(sorted(t.params.items())) for t in trials}) == n_trials


@pytest.mark.slow
def test_three_processes_share_one_sqlite_study(study_dir):
    _workers(study_dir, 3, ["--trials", "6", "--pruner", "none"], db="experiments.db")
    _check_shared_study(url_of(study_dir), 6)


@pytest.mark.slow
@pytest.mark.postgres
def test_three_processes_share_one_postgres_study(study_dir, postgres_db_url):
    _workers(study_dir, 3, ["--trials", "6", "--pruner", "none"], db=postgres_db_url)
    _check_shared_study(postgres_db_url, 6)


@pytest.mark.slow
def test_a_time_budget_stops_the_trial_with_a_checkpoint_and_the_next_session_continues(study_dir):
    # Simulated time (trainer.clock): every optimizer step counts 1 s and nothing else takes any,
    # so the 12 s budget ends the trial (4 epochs, hundreds of steps) at the same step on any machine.
    (study_dir / "tiny.yaml").write_text(TINY_STUDY.replace("epochs: 2", "epochs: 4"))
    simulated = {**env(), SIMULATED_STEP_ENV: "1"}
    session = subprocess.run(command("--trials", "1", "--time-budget", "12s", "--pruner", "none"), cwd=study_dir,
                             env=simulated, capture_output=True, text=True, timeout=900)
    assert session.returncode == 0, session.stdout[-3000:] + session.stderr[-4000:]
    assert "time limit" in session.stdout
    url = url_of(study_dir)
    run = pd.read_sql("select id, status, status_reason from runs", url).iloc[0]
    assert run.status == "interrupted" and "time budget" in run.status_reason
    stopped_at = pd.read_sql(f"select max(step) as s from checkpoints where run_id = {run.id}", url).s[0]
    assert 0 < stopped_at < 12                              # 12 simulated seconds hold fewer than 12 steps
    assert optuna.load_study(study_name="t", storage=url).trials[0].state == optuna.trial.TrialState.RUNNING
    search(study_dir, "--trials", "1", "--pruner", "none")
    resumes = pd.read_sql(f"select step from events where kind = 'resume' and run_id = {run.id}", url)
    assert list(resumes.step) == [stopped_at]
    trials = optuna.load_study(study_name="t", storage=url).trials
    assert len(trials) == 1 and trials[0].state == optuna.trial.TrialState.COMPLETE


def test_no_trial_starts_that_the_median_trial_cannot_finish_on_the_studys_clock():
    """The study-level budget follows the same simulated clock as the trials' (no model needed)."""
    from studies.context import StudyContext
    from studies.worker import _out_of_time, typical_trial_seconds

    study = optuna.create_study()
    for last_step in (10, 30, 20):                  # completed trials, evaluated at their last step
        trial = study.ask()
        trial.report(1.0, last_step)
        study.tell(trial, 1.0)
    clock, logs = SimulatedTime(step_s=0.5), []
    assert typical_trial_seconds(study, clock) == 10.0               # the median, 20 steps of 0.5 s
    deadline = wall_clock(clock).astimezone(dt.timezone.utc) + dt.timedelta(seconds=15)
    ctx = StudyContext(study=study, storage_url="", db=None, base=TrainConfig(), space=[], data=None,
                       study_name="t", out_dir=Path("runs"), n_trials=9, lock=None, deadline=deadline,
                       stop_starting_at=clock() + 8.0, time_source=clock, log=logs.append)
    assert _out_of_time(ctx) is None                                 # 15 s left, a trial takes 10 s
    for _ in range(12):                                              # 6 simulated seconds pass
        clock.take_step()
    assert _out_of_time(ctx) == "time budget" and "9 s left, a trial takes about 10 s" in logs[-1]
    ctx.deadline = None
    for _ in range(4):                                               # 8 s since the start: --timeout
        clock.take_step()
    assert _out_of_time(ctx) == "timeout"


def test_failing_trials_are_recorded_and_the_study_stops_at_max_failures(study_dir):
    """Every trial draws n_embd 30 with 4 heads: a bad combination, recorded as failed."""
    (study_dir / "space.yaml").write_text("n_embd: {type: categorical, choices: [30]}\n"
                                          "lr: {type: float, low: 1.0e-3, high: 2.0e-3}\n")
    out = search(study_dir, "--trials", "5", "--max-failures", "2", expect=3)
    assert "stopped after 2 failed trials" in out
    url = url_of(study_dir)
    trials = optuna.load_study(study_name="t", storage=url).get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.FAIL] * 2
    assert all("not divisible by --n-head 4" in t.user_attrs["fail_reason"] for t in trials)
    runs = pd.read_sql("select trial_number, status, status_reason from runs order by trial_number", url)
    assert list(runs.status) == ["failed", "failed"]
    assert runs.status_reason.str.contains("--n-embd 30").all()


@pytest.mark.slow
def test_a_diverging_trial_is_pruned_with_its_reason_and_the_study_completes(study_dir, monkeypatch):
    """Each trial's losses are NaN at its steps 1-6 (trainer.memory's fault injection): two streaks
    of --max-nonfinite-steps 2, so it diverges on any machine (a huge learning rate diverges
    where the CPU's arithmetic lets it: not a thing to test on)."""
    (study_dir / "tiny.yaml").write_text(TINY_STUDY + "max_nonfinite_steps: 2\nprecision: fp32\n")
    (study_dir / "space.yaml").write_text("lr: {type: categorical, choices: [0.001]}\n")
    monkeypatch.setenv("TRAINER_INJECT_NAN", "1,2,3,4,5,6")
    search(study_dir, "--trials", "2", "--pruner", "none")
    url = url_of(study_dir)
    trials = optuna.load_study(study_name="t", storage=url).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.PRUNED] * 2
    runs = pd.read_sql("select status, status_reason from runs", url)
    assert list(runs.status) == ["pruned", "pruned"] and runs.status_reason.str.startswith("diverged").all()


def test_each_worker_of_n_jobs_takes_the_next_device_in_turn():
    import torch

    from studies.runner import trial_devices
    assert trial_devices("cuda:0, cuda:1", 3) == ["cuda:0", "cuda:1", "cuda:0"]
    assert trial_devices("cuda:1", 2) == ["cuda:1", "cuda:1"]
    visible = [f"cuda:{i}" for i in range(torch.cuda.device_count())]      # the default: every visible GPU
    assert trial_devices(None, 2) == ([visible[k % len(visible)] for k in range(2)] if visible else [None, None])

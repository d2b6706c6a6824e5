"""No repeated trials: each new trial's sampler is seeded by (--seed, trial number).

The fast tests drive real Optuna studies on a real SQLite storage without training: a
study "continued" by a fresh Study object (what a new process builds) draws what one
uninterrupted study draws. The slow one runs the real command in 3 invocations and in 1.
"""
import subprocess

import optuna
import pytest

from studies.sampling import ask_new_trial, trial_seed
from studies.space import Param
from test_study import TINY_SPACE, TINY_STUDY, env, command

SPACE = [Param("lr", low=1e-4, high=1e-2, log=True), Param("n_layer", "int", 1, 4),
         Param("n_embd", "categorical", choices=(32, 48, 64))]


def _session(url: str, n: int, sampler: str = "tpe", seed: int = 0) -> None:
    """One 'process': a new Study object on the storage, asking and telling n trials."""
    study = optuna.create_study(study_name="s", storage=url, load_if_exists=True)
    for _ in range(n):
        trial = ask_new_trial(study, sampler, seed, SPACE)
        study.tell(trial, trial.params["lr"] * trial.params["n_layer"])   # any deterministic value


def _params(url: str) -> list[dict]:
    return [t.params for t in optuna.load_study(study_name="s", storage=url).trials]


@pytest.mark.parametrize("sampler", ["tpe", "random", "cmaes"])
def test_three_sessions_of_two_draw_what_one_session_of_six_draws(tmp_path, sampler):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    split, whole = f"sqlite:///{tmp_path / 'split.db'}", f"sqlite:///{tmp_path / 'whole.db'}"
    for _ in range(3):
        _session(split, 2, sampler)
    _session(whole, 6, sampler)
    assert _params(split) == _params(whole)
    assert len({tuple(sorted(p.items())) for p in _params(split)}) == 6    # and nothing repeated


def test_a_continued_session_does_not_redraw_the_first_sessions_trials(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    _session(url, 2)
    _session(url, 2)   # before the fix, trials 2 and 3 equalled 0 and 1
    drawn = _params(url)
    assert drawn[2:] != drawn[:2] and len({p["lr"] for p in drawn}) == 4


def test_seeds_differ_by_trial_and_by_study_seed():
    seeds = {trial_seed(seed, n) for seed in range(3) for n in range(100)}
    assert len(seeds) == 300


def _search(cwd, *flags):
    result = subprocess.run(command(*flags, "--pruner", "none", "--progress", "false"), cwd=cwd, env=env(),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]


@pytest.mark.slow
def test_a_study_split_over_three_invocations_equals_the_same_study_in_one(tmp_path):
    """The real command: --trials 2, 4, 6 in three processes, and --trials 6 in one."""
    folders = {}
    for name in ("split", "whole"):
        folders[name] = tmp_path / name
        folders[name].mkdir()
        (folders[name] / "tiny.yaml").write_text(TINY_STUDY.replace("epochs: 2", "epochs: 1\nmax_steps: 4"))
        (folders[name] / "space.yaml").write_text(TINY_SPACE)
    for n in (2, 4, 6):
        _search(folders["split"], "--trials", str(n), "--seed", "5")
    _search(folders["whole"], "--trials", "6", "--seed", "5")
    drawn = {name: [t.params for t in optuna.load_study(
        study_name="t", storage=f"sqlite:///{folder / 'experiments.db'}").trials] for name, folder in folders.items()}
    assert drawn["split"] == drawn["whole"]
    assert len({tuple(sorted(p.items())) for p in drawn["split"]}) == 6

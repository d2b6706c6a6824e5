"""What a study minimises: val_loss, or bits per byte where the space changes the vocabulary.
The choice, its refusals (exit 2, nothing written), its record with the study, and a real study
over BPE vocabulary sizes ranked in bits per byte."""
import json
import math
import os
import subprocess
import sys

import optuna
import pandas as pd
import pytest

from studies.objective import OBJECTIVE_ATTR, choose_objective, objective_problems
from studies.results import results_table
from studies.runner import keep_objective
from studies.trial import TrialRecorder
from trainer.errors import ConfigError
from trainer.recorder import NullRecorder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = """\
subset: 0.03
block_size: 64
epochs: 1
eval_every: 10
eval_batches: 4
n_layer: 1
n_embd: 32
progress: false
"""
VOCAB_SPACE = "vocab_size: {type: categorical, choices: [300, 512]}\n"
LR_SPACE = "lr: {type: categorical, choices: [0.001, 0.002]}\n"


def search(cwd, *flags, space="space.yaml", expect=0):
    command = [sys.executable, "-m", "studies.search", "--config", "tiny.yaml", "--space", space,
               "--study-name", "v", "--db", "experiments.db", *flags]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == expect, result.stdout[-3000:] + result.stderr[-4000:]
    return result


@pytest.fixture
def study_dir(tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY)
    (tmp_path / "space.yaml").write_text(VOCAB_SPACE)
    (tmp_path / "lr.yaml").write_text(LR_SPACE)
    return tmp_path


def written(folder):
    return sorted(p.name for p in folder.iterdir())


# -- the choice ----------------------------------------------------------------------------------
def test_the_default_is_bits_per_byte_exactly_where_the_space_changes_the_vocabulary():
    assert choose_objective(None, ["lr", "vocab_size"]) == "val_bpb"
    assert choose_objective(None, ["tokenizer"]) == "val_bpb"
    assert choose_objective(None, ["lr", "n_layer"]) == "val_loss"          # studies keep their objective
    assert choose_objective("val_bpb", ["lr"]) == "val_bpb"                  # asked for: fine anywhere
    assert objective_problems("val_loss", ["lr"]) == []
    with pytest.raises(ConfigError) as err:
        choose_objective("val_loss", ["lr", "vocab_size", "tokenizer"])
    assert err.value.problems == [
        "--objective val_loss: the space searches vocab_size, tokenizer, and losses per token of different "
        "vocabularies are not comparable (a token holds more or less text); use --objective val_bpb (the "
        "default for such a space)"]


def test_val_loss_over_vocabularies_is_refused_before_anything_is_written(study_dir):
    result = search(study_dir, "--objective", "val_loss", expect=2)
    assert "--objective val_loss: the space searches vocab_size" in result.stderr
    assert "use --objective val_bpb" in result.stderr
    assert written(study_dir) == ["lr.yaml", "space.yaml", "tiny.yaml"]     # no database, cache or runs/


def test_a_vocab_size_that_no_trial_would_use_is_refused(study_dir):
    (study_dir / "tiny.yaml").write_text(TINY + "tokenizer: gpt2\n")
    result = search(study_dir, expect=2)
    assert "parameter 'vocab_size' sizes the BPE tokenizer" in result.stderr
    assert written(study_dir) == ["lr.yaml", "space.yaml", "tiny.yaml"]


def test_a_study_that_minimises_another_objective_is_refused_before_anything_is_written(study_dir):
    url = f"sqlite:///{study_dir / 'experiments.db'}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="v", storage=url)
    study.set_user_attr(OBJECTIVE_ATTR, "val_loss")
    result = search(study_dir, expect=2)                     # the vocab space: val_bpb by default
    assert ("--study-name 'v': the study minimises val_loss, and this command would minimise val_bpb"
            in result.stderr)
    assert "--objective val_loss" in result.stderr
    tables = pd.read_sql("select name from sqlite_master where type = 'table'", url)["name"]
    assert "runs" not in set(tables)                         # expdb's tables were not created
    assert written(study_dir) == ["experiments.db", "lr.yaml", "space.yaml", "tiny.yaml"]


def test_a_study_from_before_the_choice_minimised_val_loss():
    """No attribute, but trials: their values are validation losses; a new study takes the choice."""
    study = optuna.create_study(study_name="old")
    study.tell(study.ask(), 3.0)
    with pytest.raises(ConfigError, match="the study minimises val_loss, and this command would minimise val_bpb"):
        keep_objective(study, "val_bpb")
    keep_objective(study, "val_loss")
    assert study.user_attrs[OBJECTIVE_ATTR] == "val_loss"
    new = optuna.create_study(study_name="new")
    keep_objective(new, "val_bpb")
    assert new.user_attrs[OBJECTIVE_ATTR] == "val_bpb"
    with pytest.raises(ConfigError, match="minimises val_bpb"):
        keep_objective(new, "val_loss")


# -- the trial reports the objective --------------------------------------------------------------
@pytest.mark.parametrize("objective, reported", [("val_loss", {10: 4.0, 20: 3.0}), ("val_bpb", {10: 2.0})])
def test_each_evaluation_reports_the_studys_objective_to_the_pruner(objective, reported):
    study = optuna.create_study()
    trial = study.ask()
    recorder = TrialRecorder(NullRecorder(), trial, None, objective)
    recorder.log_eval(10, 0, {"val_loss": 4.0, "val_bpb": 2.0})
    recorder.log_eval(20, 0, {"val_loss": 3.0, "val_bpb": math.nan})        # no evidence: not reported
    study.tell(trial, 1.0)
    assert study.trials[0].intermediate_values == reported
    assert math.isnan(recorder.last_value) == (objective == "val_bpb")


def test_the_results_table_shows_both_measures_with_the_objective_from_optuna():
    study = optuna.create_study()
    for run_id, bpb in ((7, 1.5), (8, 1.2)):
        trial = study.ask()
        trial.set_user_attr("run_id", run_id)
        study.tell(trial, bpb)
    runs = pd.DataFrame(dict(id=[7, 8], best_val_loss=[3.0, 4.0], best_val_bpb=[None, None]))
    table = results_table(study, "val_bpb", runs)
    assert list(table["val_bpb"]) == [1.5, 1.2] and list(table["val_loss"]) == [3.0, 4.0]
    assert table["val_ppl"].tolist() == pytest.approx([math.exp(3.0), math.exp(4.0)])
    old = results_table(study)                     # a val_loss study, no runs read: bpb unknown
    assert list(old["val_loss"]) == [1.5, 1.2] and old["val_bpb"].isna().all()


# -- a real study ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_study_over_vocabulary_sizes_is_ranked_in_bits_per_byte(study_dir):
    out = search(study_dir, "--trials", "2", "--sampler", "grid", "--pruner", "none").stdout
    assert "best trial" in out and "bits per byte" in out
    url = f"sqlite:///{study_dir / 'experiments.db'}"
    study = optuna.load_study(study_name="v", storage=url)
    assert study.user_attrs[OBJECTIVE_ATTR] == "val_bpb"
    runs = pd.read_sql("select id, tokenizer, best_val_loss, best_val_bpb from runs", url).set_index("id")
    trials = study.get_trials()
    assert sorted(t.params["vocab_size"] for t in trials) == [300, 512]
    for t in trials:
        run = runs.loc[t.user_attrs["run_id"]]
        assert json.loads(run.tokenizer)["vocab_size"] == t.params["vocab_size"]   # its own tokenizer
        assert t.value == pytest.approx(run.best_val_bpb) and t.value != pytest.approx(run.best_val_loss)
        evals = pd.read_sql(f"select step, val_bpb from eval_metrics where run_id = {run.name}", url)
        assert t.intermediate_values == pytest.approx(dict(zip(evals.step, evals.val_bpb)))
    assert study.best_trial.value == min(runs.best_val_bpb)
    # the study goes on in bits per byte: a space without the vocabulary would switch to val_loss
    refused = search(study_dir, "--trials", "3", space="lr.yaml", expect=2)
    assert "the study minimises val_bpb, and this command would minimise val_loss" in refused.stderr
    assert len(optuna.load_study(study_name="v", storage=url).trials) == 2
    report = subprocess.run([sys.executable, "-m", "studies.report", "--study", "v"], cwd=study_dir,
                            env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    assert "objective: val_bpb" in report.stdout
    assert "objective: val_bpb" in (study_dir / "runs/v/report.html").read_text()

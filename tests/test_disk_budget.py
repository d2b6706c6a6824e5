"""The study-wide disk budget: finished trials keep only what the study needs, every
removal is recorded, and a trial that cannot fit is not started."""
import pandas as pd
import pytest

from studies.disk import gpt2_parameters
from test_sessions import run, working_folder
from trainer.config import TrainConfig

MB = 1e6


@pytest.mark.parametrize("n_layer, n_embd, vocab", [(1, 32, 512), (2, 48, 512), (6, 384, 8192)])
def test_the_parameter_formula_is_that_of_the_built_model(n_layer, n_embd, vocab):
    from trainer.model import build_model, count_parameters

    cfg = TrainConfig(n_layer=n_layer, n_embd=n_embd, n_head=4, block_size=64)
    assert gpt2_parameters(cfg, vocab) == count_parameters(build_model(cfg, vocab, 0))


def budget_bytes(folder):
    """What the budget counts: the study's folder, the database, the session pack."""
    files = [*(folder / "runs").rglob("*"), *folder.glob("experiments.db*"), *folder.glob("session-pack*")]
    files += list((folder / "session-pack").rglob("*"))
    return sum(f.stat().st_size for f in files if f.is_file())


@pytest.mark.slow
def test_a_disk_budget_run_never_exceeds_its_budget(tmp_path):
    folder = working_folder(tmp_path / "work")
    budget_gb, sizes = 0.03, []
    for n in range(1, 6):       # one more trial per invocation: the folder measured after each trial
        run(folder, "--trials", str(n), "--max-disk-gb", str(budget_gb), "--keep-best-trials", "2")
        sizes.append(budget_bytes(folder))
    assert max(sizes) <= budget_gb * 1e9, sizes
    url = f"sqlite:///{folder / 'experiments.db'}"
    ckpts = pd.read_sql("select run_id, deleted from checkpoints", url)
    assert ckpts.deleted.all()                    # finished trials keep no checkpoint, and say so
    assert not list(folder.glob("runs/t/trial-*/checkpoints/step-*"))
    assert len(list(folder.glob("runs/t/trial-*/final_model"))) == 2      # the 2 best only
    removed = pd.read_sql("select run_id from events where kind = 'study_files_removed'", url)
    assert set(removed.run_id) == set(ckpts.run_id)


@pytest.mark.slow
def test_a_trial_that_cannot_fit_the_budget_is_not_started(tmp_path):
    folder = working_folder(tmp_path / "work")
    out = run(folder, "--trials", "2", "--max-disk-gb", "0.002", expect=4).stdout
    assert "--max-disk-gb 0.002: " in out and "not started" in out
    assert not list(folder.glob("runs/t/trial-*/checkpoints/step-*"))

"""A full disk is a fault the run survives (issue 28): on a real small filesystem (a tmpfs, mounted
as root, as CI runs), where the space left is set by a ballast file sized from a measured checkpoint."""
import os
import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file

import expdb
from trainer.run import train

MB = 1024 ** 2


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def leave_free(disk: Path, n_bytes: int) -> Path:
    """Fill ``disk`` with a ballast file until ``n_bytes`` are free."""
    ballast = disk / "ballast"
    with open(ballast, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize - n_bytes)
    return ballast


def run(cfg, data, db_path, out, lines, **kw):
    db = expdb.open(db_path)
    result = train(cfg.replace(out_dir=str(out)), db.recorder(), data=data, log=lines.append, **kw)
    return result, db


def final_weights(out: Path) -> dict:
    return load_file(str(out / "final_model" / "model.safetensors"))


@pytest.fixture
def disk_cfg(tiny_cfg):
    # checkpoints at steps 10, 20, 30 and the final one at 40; each evaluated (a best exists)
    return tiny_cfg.replace(max_steps=40, save_every=10, eval_every=10, keep_checkpoints=4, epochs=2)


@pytest.fixture
def reference(disk_cfg, tiny_data, tmp_path):
    """The uninterrupted run on a roomy disk, and the size of one of its checkpoints."""
    lines = []
    result, _ = run(disk_cfg, tiny_data, tmp_path / "ref.db", tmp_path / "ref", lines)
    checkpoint = Path(result.final_checkpoint)
    size = sum(f.stat().st_size for f in checkpoint.iterdir())
    return result, size, tmp_path / "ref"


@pytest.mark.slow
def test_a_checkpoint_that_finds_the_disk_full_costs_that_checkpoint_not_the_run(disk_cfg, tiny_data, tmp_path,
                                                                                  small_disk, reference):
    _, size, ref_out = reference
    leave_free(small_disk, int(2.5 * size))       # two checkpoints fit, the third does not
    lines = []
    result, db = run(disk_cfg, tiny_data, tmp_path / "full.db", small_disk / "run", lines)
    assert result.status == "completed" and result.steps == 40, result.reason
    events = db.events(result.run_id)
    failed = events[events.kind == "checkpoint_failed"]
    assert list(failed.step) == [30]
    detail = failed.detail.iloc[0]
    assert "No space left on device" in detail["error"] and 0 <= detail["free_bytes"] < size
    warning = next(line for line in lines if "not written" in line)
    assert "step 30" in warning and "--keep-checkpoints" in warning and "--save-optimizer-state false" in warning
    # room was made (all but the newest and the best deleted) and the next interval wrote again
    names = sorted(p.name for p in (small_disk / "run" / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert names[-1] == "step-0000040" and "step-0000030" not in names
    assert not [p for p in (small_disk / "run").rglob(".tmp*")]          # no half-written leftovers
    # training itself never needed the disk: the weights are the uninterrupted run's
    assert {k: v.tolist() for k, v in final_weights(small_disk / "run").items()} == \
           {k: v.tolist() for k, v in final_weights(ref_out).items()}


@pytest.mark.slow
def test_no_room_for_the_final_model_stops_the_run_interrupted_and_resume_auto_completes_it(
        disk_cfg, tiny_data, tmp_path, small_disk, reference):
    _, size, ref_out = reference
    ballast = leave_free(small_disk, int(1.5 * size))     # one checkpoint fits, never a second
    lines = []
    result, db = run(disk_cfg, tiny_data, tmp_path / "full.db", small_disk / "run", lines)
    assert result.status == "interrupted", result.reason
    assert "continue with --resume auto" in result.reason and "No space left on device" in result.reason
    assert Path(result.final_checkpoint).name == "step-0000010"      # the newest complete one
    assert db.run(result.run_id).status == "interrupted"
    assert not (small_disk / "run" / "final_model").exists()
    ballast.unlink()                                           # the user frees space
    resumed, db = run(disk_cfg, tiny_data, tmp_path / "full.db", small_disk / "run", lines, resume="auto")
    assert resumed.status == "completed" and resumed.run_id == result.run_id
    assert {k: v.tolist() for k, v in final_weights(small_disk / "run").items()} == \
           {k: v.tolist() for k, v in final_weights(ref_out).items()}

"""SIGKILL anywhere: during `expdb merge`, while a session pack is written, and during the
study's disk-budget clean-up; the next command accepts what was left and completes.

Each kill is placed by an injected pause (``trainer.files.pause_point``): the process writes
``<point>.paused`` and sleeps there, and the test kills it once the file exists. No timing.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pandas as pd
import pytest

import expdb
from test_expdb import make_info
from test_sessions import run, trials_of, working_folder
from test_study import command, env
from trainer.files import PAUSE_AT_ENV, PAUSE_DIR_ENV
from trainer.pack import (PACK_DIR, PACK_JSON, PACK_TAR, find_packs, input_problems, pack_problems, pack_run,
                          read_pack)

STEPS = 300


def killed_at(point: str, args: list[str], cwd: Path, extra_env: dict | None = None) -> None:
    """Run ``args`` until it pauses at ``point``, then SIGKILL it."""
    marker = cwd / f"{point}.paused"
    proc = subprocess.Popen(args, cwd=cwd, env={**env(), **(extra_env or {}), PAUSE_AT_ENV: point,
                                                PAUSE_DIR_ENV: str(cwd)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"{args} ended (exit {proc.returncode}) before reaching {point}:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stdout.close()
    marker.unlink()


def ok(args: list[str], cwd: Path) -> str:
    done = subprocess.run(args, cwd=cwd, env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def recorded_db(path: Path, names: list[str]) -> None:
    with expdb.open(path) as db:
        for name in names:
            rec = db.recorder()
            rec.start_run(make_info(name))
            for step in range(STEPS):
                rec.log_step(step, {"loss": 1.0 / (step + 1)})
            rec.log_event("oom", 7, {"micro_batch": 2})
            rec.finish("completed")


# -- expdb merge ---------------------------------------------------------------------------
def test_a_merge_killed_mid_transaction_is_completed_by_running_it_again(tmp_path):
    recorded_db(tmp_path / "a.db", ["a1", "a2"])
    recorded_db(tmp_path / "b.db", ["b1"])
    merge = [sys.executable, "-m", "expdb", "merge", "a.db", "b.db", "--into", "all.db"]
    killed_at("merge.run_copied", merge, tmp_path)
    with expdb.open(tmp_path / "all.db") as db:     # opens: nothing of the killed transaction is there
        assert db.runs().empty
    ok([sys.executable, "-m", "expdb", "--db", "all.db", "check"], tmp_path)
    ok(merge, tmp_path)
    ok(merge, tmp_path)                             # and again: nothing is added twice
    with expdb.open(tmp_path / "all.db") as db:
        runs = db.runs()
        assert sorted(runs.name) == ["a1", "a2", "b1"] and runs.uid.is_unique
        for run_id in runs.id:
            assert list(db.steps(run_id).step) == list(range(STEPS))
            assert sorted(db.events(run_id).kind) == ["merged", "oom"]


# -- the session pack ------------------------------------------------------------------------
def run_folder(tmp_path: Path) -> Path:
    """A run's folder (a final model) and its database: what `python -m trainer.pack` packs."""
    model = tmp_path / "runs" / "r" / "final_model"
    model.mkdir(parents=True)
    (model / "model.safetensors").write_bytes(os.urandom(200_000))
    (model / "config.json").write_text("{}")
    recorded_db(tmp_path / "experiments.db", ["r"])
    return tmp_path


PACK = [sys.executable, "-m", "trainer.pack", "--out", "runs/r", "--db", "experiments.db"]


@pytest.mark.parametrize("point", ["pack.staged", "pack.swapping", "pack.tar"])
def test_a_pack_killed_while_written_leaves_a_whole_pack_and_the_next_pack_completes(tmp_path, point):
    work = run_folder(tmp_path)

    def pack_again():       # `python -m trainer.pack`, in-process
        pack_run(work / "runs/r", work / "experiments.db", work, "next")

    pack_again()                                    # the previous session's pack
    (work / "runs/r/final_model/tokenizer.json").write_text("{}")     # the new pack has one file more
    killed_at(point, PACK, work)
    packs = find_packs(work)                        # what the next session's --continue-from finds
    assert len(packs) == 1 and pack_problems(packs[0], read_pack(packs[0])) == []
    problems = input_problems(work / PACK_DIR, "--continue-from")
    if point == "pack.swapping":                    # between the two renames: the new pack is whole
        assert packs[0].name == f".tmp-{PACK_DIR}"
        assert problems == [f"--continue-from {str(work / PACK_DIR)!r}: no such folder: its pack was being "
                            f"swapped in when the process was killed; pass {packs[0]} (the complete new "
                            "pack), or write the pack again"]
        assert input_problems(packs[0], "--continue-from") == []
    else:
        assert problems == []
    pack_again()                                    # the next pack
    folder = work / PACK_DIR
    meta = read_pack(folder)
    assert pack_problems(folder, meta) == [] and "run/final_model/tokenizer.json" in meta["files"]
    assert sorted(p.name for p in work.iterdir() if p.name.startswith(".tmp-")) == []
    with tarfile.open(work / PACK_TAR) as tar:
        packed = tar.extractfile(f"{PACK_DIR}/{PACK_JSON}").read()
    assert packed == (folder / PACK_JSON).read_bytes()


# -- the disk budget's clean-up --------------------------------------------------------------
@pytest.mark.slow
def test_a_disk_clean_up_killed_mid_way_is_finished_by_the_next_session(tmp_path):
    work = working_folder(tmp_path / "work")
    flags = ["--pruner", "none", "--progress", "false", "--max-disk-gb", "1", "--keep-best-trials", "1"]
    killed_at("disk.removing", command("--trials", "1", *flags), work, {"TRAINER_SIMULATED_STEP_S": "10"})
    trash = list(work.glob("runs/t/trial-0000/.tmp-removing-*"))
    assert len(trash) == 1 and not (work / "runs/t/trial-0000/checkpoints").exists()
    assert [t.state.name for t in trials_of(work)] == ["COMPLETE"]
    out = run(work, "--trials", "2", *flags[4:]).stdout     # the next session: one more trial
    assert "disk: removed" in out and "that an interrupted clean-up left" in out
    assert [t.state.name for t in trials_of(work)] == ["COMPLETE", "COMPLETE"]
    assert not list(work.glob("runs/t/trial-*/.tmp-removing-*"))
    assert not list(work.glob("runs/t/trial-*/checkpoints"))
    assert len(list(work.glob("runs/t/trial-*/final_model"))) == 1      # the best one only
    url = f"sqlite:///{work / 'experiments.db'}"
    ckpts = pd.read_sql("select deleted from checkpoints", url)
    assert len(ckpts) and ckpts.deleted.all()
    events = pd.read_sql("select detail from events where kind = 'study_files_removed'", url)
    assert events.detail.str.contains("an earlier clean-up was interrupted").sum() == 1

"""`python -m trainer` killed for real: SIGKILL at random moments (some during checkpoint
writes), SIGTERM mid-epoch, a time budget; every restart with --resume auto continues from
the last complete checkpoint and the run ends with the weights of an uninterrupted one."""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer.checkpoints import MODEL_FILE, read_info, verify_checkpoint
from trainer.clock import SIMULATED_STEP_ENV
from trainer.errors import CheckpointError
from trainer.checkpoints.format import OLD_PREFIX
from trainer.files import TMP_PREFIX

ROOT = Path(__file__).resolve().parents[1]
# The tiny model; one thread, so that the test's speed does not depend on how busy the machine is.
FLAGS = ["--subset", "0.03", "--vocab-size", "512", "--n-layer", "1", "--n-embd", "32", "--n-head", "2",
         "--block-size", "32", "--micro-batch", "8", "--grad-accum", "2", "--precision", "fp32",
         "--save-every", "5", "--eval-every", "20", "--eval-batches", "4", "--epochs", "1",
         "--max-steps", "160", "--progress", "false"]
RESTARTS = 10


def start(workdir: Path, name: str, cache: Path, *extra: str) -> tuple[subprocess.Popen, Path]:
    log = workdir / f"{name}.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "trainer", *FLAGS, "--cache-dir", str(cache), *extra],
                                cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT)
    return proc, log


def wait_until(condition, proc: subprocess.Popen, timeout: float = 120.0) -> bool:
    """Poll every half millisecond; False if the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return condition()
        time.sleep(0.0005)
    raise TimeoutError("the trainer did not get there in time")


def newest_complete(root: Path) -> Path | None:
    """What --resume auto must pick: the most recently written checkpoint that verifies."""
    found = []
    for d in root.glob("step-*"):
        try:
            verify_checkpoint(d)
            found.append((read_info(d).written_at, d))
        except CheckpointError:
            continue
    return max(found)[1].resolve() if found else None


def started(log: Path) -> bool:
    return any(line.startswith("run ") for line in log.read_text().splitlines())


def writing(root: Path) -> set[str]:
    """Checkpoints being written at this moment (their temporary directories)."""
    try:
        return {p.name for p in root.iterdir() if p.name.startswith(f"{TMP_PREFIX}step-")}
    except FileNotFoundError:
        return set()


def second_write(root: Path):
    """A condition: a second checkpoint write has begun (and is still going on)."""
    seen: set[str] = set()

    def check() -> bool:
        now = writing(root)
        seen.update(now)
        return len(seen) >= 2 and bool(now)
    return check


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, shared_cache):
    work = tmp_path_factory.mktemp("uninterrupted")
    proc, log = start(work, "run", shared_cache, "--out", "run", "--db", "exp.db")
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    return work


def final_weights(run_dir: Path) -> dict:
    return load_file(str(run_dir / "final_model" / MODEL_FILE))


def step_losses(db_path: Path) -> dict:
    import expdb

    db = expdb.open(db_path)
    try:
        [run_id] = list(db.runs()["id"])
        steps = db.steps(int(run_id))
        return dict(zip(steps["step"], steps["loss"], strict=True))
    finally:
        db.close()


@pytest.mark.slow
def test_sigkill_at_random_moments_ten_times_loses_nothing(tmp_path, shared_cache, uninterrupted):
    rng = random.Random(int(os.environ.get("KILL_TEST_SEED", "20240611")))   # another seed: other moments
    root = tmp_path / "run" / "checkpoints"
    modes = ["during-write"] * 4 + ["random"] * (RESTARTS - 4)
    rng.shuffle(modes)
    resumed_from, killed_while_writing = [], 0
    for i, mode in enumerate(modes):
        expected = newest_complete(root)
        proc, log = start(tmp_path, f"round-{i}", shared_cache, "--out", "run", "--db", "exp.db", "--resume", "auto")
        try:
            if not wait_until(lambda log=log: started(log), proc):
                break                                   # it finished before it could be killed
            text = log.read_text()
            if expected is None:
                assert "resuming from" not in text, text
            else:
                assert f"resuming from {expected}:" in text, (expected, text)     # the newest complete one
                resumed_from.append(read_info(expected).step)
            if mode == "during-write":
                # The second write of this round: the first one completes, so the run moves on.
                if not wait_until(second_write(root), proc, timeout=120):
                    break
            else:
                time.sleep(rng.uniform(0.1, 1.0))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
            killed_while_writing += bool(writing(root))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    proc, log = start(tmp_path, "last", shared_cache, "--out", "run", "--db", "exp.db", "--resume", "auto")
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]

    assert len(resumed_from) >= RESTARTS - 2 and killed_while_writing >= 2, (resumed_from, killed_while_writing)
    assert resumed_from == sorted(resumed_from)          # never went back behind a complete checkpoint
    expected, got = final_weights(uninterrupted / "run"), final_weights(tmp_path / "run")
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert step_losses(tmp_path / "exp.db") == step_losses(uninterrupted / "exp.db")
    assert not [p for p in root.iterdir() if p.name.startswith(TMP_PREFIX)]


@pytest.mark.slow
def test_sigterm_mid_epoch_saves_exits_143_and_resumes_exactly(tmp_path, shared_cache, uninterrupted):
    proc, log = start(tmp_path, "first", shared_cache, "--out", "run", "--db", "exp.db")
    wait_until(lambda: started(log), proc)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143, log.read_text()[-3000:]
    text = log.read_text()
    assert "interrupted by SIGTERM; resume from" in text
    checkpoint = Path(text.split("interrupted by SIGTERM; resume from ")[1].split()[0])
    info = read_info(checkpoint)
    verify_checkpoint(checkpoint)
    stopped_at = int(text.split("SIGTERM: stopped at step ")[1].split(";")[0])
    assert info.step == stopped_at and 0 < stopped_at < 160 and info.epoch == 0
    # an emergency checkpoint, unless a scheduled one of that very step was just written: periodic every
    # 5 steps, or "best" at an evaluation step (every 20): where the signal lands depends on the machine's speed
    assert info.kind == "emergency" or (info.kind in ("periodic", "best") and stopped_at % 5 == 0)
    proc, log = start(tmp_path, "second", shared_cache, "--out", "run", "--db", "exp.db", "--resume", "auto")
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    expected, got = final_weights(uninterrupted / "run"), final_weights(tmp_path / "run")
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert step_losses(tmp_path / "exp.db") == step_losses(uninterrupted / "exp.db")


@pytest.mark.slow
def test_a_time_budget_exits_75_with_a_checkpoint(tmp_path, shared_cache, monkeypatch):
    # Simulated time (0.05 s per step, trainer.clock): a fast machine cannot finish inside the budget.
    monkeypatch.setenv(SIMULATED_STEP_ENV, "0.05")
    proc, log = start(tmp_path, "budget", shared_cache, "--out", "run", "--no-db", "--time-budget", "3s",
                      "--max-steps", "100000", "--epochs", "50")
    assert proc.wait(timeout=300) == 75, log.read_text()[-3000:]
    text = log.read_text()
    assert "time budget: stopped at step" in text and "--resume auto" in text
    assert list((tmp_path / "run" / "checkpoints").glob("step-*"))


@pytest.mark.slow
def test_a_kill_during_checkpoint_rotation_is_tidied_by_the_next_start(tmp_path, shared_cache, uninterrupted,
                                                                        monkeypatch):
    """SIGKILL while rotation deletes an old checkpoint (renamed aside, not yet removed nor recorded
    as deleted), placed by an injected pause; --resume auto tidies it and ends as the uninterrupted run."""
    import expdb
    from trainer.files import PAUSE_AT_ENV, PAUSE_DIR_ENV

    monkeypatch.setenv(PAUSE_AT_ENV, "checkpoint-rotation")
    monkeypatch.setenv(PAUSE_DIR_ENV, str(tmp_path))
    args = ("--out", "run", "--db", "exp.db", "--keep-checkpoints", "2")
    proc, log = start(tmp_path, "killed", shared_cache, *args)
    marker = tmp_path / "checkpoint-rotation.paused"
    assert wait_until(marker.exists, proc, timeout=600), log.read_text()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    root = tmp_path / "run" / "checkpoints"
    assert [p for p in root.iterdir() if p.name.startswith(OLD_PREFIX)]   # the kill left one aside
    monkeypatch.delenv(PAUSE_AT_ENV)
    proc, log = start(tmp_path, "resumed", shared_cache, *args, "--resume", "auto")
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    assert not [p for p in root.iterdir() if p.name.startswith((OLD_PREFIX, TMP_PREFIX))]
    with expdb.open(tmp_path / "exp.db") as db:
        [run_id] = list(db.runs()["id"])
        rows = db.checkpoints(int(run_id))
    on_disk = {p.name for p in root.glob("step-*")}
    live = {Path(p).name for p in rows[~rows.deleted].path}
    assert live == on_disk                      # every row of a checkpoint that is gone says deleted
    for name, t in final_weights(uninterrupted / "run").items():
        assert torch.equal(final_weights(tmp_path / "run")[name], t), name
    assert step_losses(tmp_path / "exp.db") == step_losses(uninterrupted / "exp.db")

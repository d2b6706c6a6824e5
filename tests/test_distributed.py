"""Data-parallel training for real: 2 processes started by torchrun, gloo on the CPU.

Every run trains the same tiny model on a tiny corpus this module writes. The 2-process
runs take micro-batch 4 x 1 accumulation x 2 processes per optimizer step; the 1-process
reference takes 4 x 2 x 1: the same 8 sequences per step, in the same order.
"""
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer.distributed import World, peer_failure, share, split_for
from trainer.errors import RankLost
from trainer.interrupts import StopRequests
from trainer.state import Split

STEPS = 40
WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly brew potent elixirs "
         "in old copper pots").split()


def flags(out: Path, cache: Path, corpus: Path, **more) -> list[str]:
    settings = {"data-files": corpus, "subset": 1.0, "vocab-size": 300, "n-layer": 1, "n-embd": 32, "n-head": 2,
                "block-size": 32, "precision": "fp32", "device": "cpu", "progress": "false",
                "max-steps": STEPS, "eval-every": 10, "eval-batches": 4, "save-every": 10, "keep-checkpoints": 10,
                "warmup-steps": 2, "lr": 3e-3, "micro-batch": 4, "grad-accum": 1, "cache-dir": cache,
                "out": out, "db": f"{out}.db", **more}
    return [x for k, v in settings.items() for x in (f"--{k}", str(v))]


def launch(nproc: int, args: list[str], env: dict[str, str] | None = None, **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    if nproc == 1:
        cmd = [sys.executable, "-m", "trainer", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--standalone", "-m", "trainer", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def run(nproc: int, args: list[str], expect: int = 0, env: dict[str, str] | None = None) -> str:
    proc = launch(nproc, args, env)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == expect, out[-3000:]
    return out


def step_losses(db: str) -> dict[int, float]:
    with sqlite3.connect(db) as c:
        return dict(c.execute("SELECT step, loss FROM step_metrics"))


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final_model" / "model.safetensors"))


def assert_close(a: dict[int, float], b: dict[int, float], steps) -> None:
    worst = max(abs(a[s] - b[s]) / abs(b[s]) for s in steps)
    assert worst < 1e-4, worst


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    import random
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60)))})
                            + "\n" for _ in range(600)))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus):
    """The uninterrupted runs: 2 processes, and 1 process with the same 8 sequences per step."""
    root = tmp_path_factory.mktemp("ddp")
    cache = root / "cache"
    run(1, flags(root / "one", cache, corpus, **{"grad-accum": 2}))   # also fills the token cache
    run(2, flags(root / "two", cache, corpus))
    return root


def test_shares_and_splits():
    ids = list(range(8))
    assert [list(share(ids, World(r, r, 2))) for r in (0, 1)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert split_for(8, World(0, 0, 1), 4) == Split(4, 2)      # 2 -> 1: twice the accumulation
    assert split_for(8, World(0, 0, 2), 4) == Split(4, 1)      # 1 -> 2
    assert split_for(12, World(0, 0, 2), 4) == Split(3, 2)     # 6 each: the micro-batch that divides it
    assert split_for(8, World(0, 0, 3), 4) is None


def test_a_failed_all_reduce_is_a_lost_rank_and_other_errors_stay_what_they_are():
    two, one = World(0, 0, 2), World(0, 0, 1)
    gloo = RuntimeError("[third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error: Connection reset by peer\n...")
    lost = peer_failure(gloo, two)
    assert isinstance(lost, RankLost) and "Connection reset by peer" in str(lost) and "--resume auto" in str(lost)
    assert "\n" not in str(lost)                                       # one line
    assert peer_failure(gloo, one) is None                             # one process: no peer to lose
    assert peer_failure(RuntimeError("shape mismatch"), two) is None
    assert peer_failure(lost, two) is lost


def test_after_ignore_from_now_stop_signals_change_nothing_even_after_the_block():
    previous = signal.getsignal(signal.SIGTERM)
    stops = StopRequests()
    try:
        with stops.installed():
            stops.ignore_from_now()
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)     # a second one would raise KeyboardInterrupt otherwise
        assert not stops.requested
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.slow
def test_two_processes_train_as_one_with_the_same_effective_batch(runs):
    one, two = step_losses(f"{runs / 'one'}.db"), step_losses(f"{runs / 'two'}.db")
    assert sorted(two) == list(range(1, STEPS + 1))
    assert_close(two, one, range(1, STEPS + 1))
    with sqlite3.connect(f"{runs / 'two'}.db") as c:
        assert c.execute("SELECT status FROM runs").fetchall() == [("completed",)]     # one run row
    # one set of checkpoints, rank 0's, and nothing else in the run folder
    assert sorted(p.name for p in (runs / "two").iterdir()) == ["checkpoints", "final_model", "run.json"]
    assert sorted(p.name for p in (runs / "two/checkpoints").glob("step-*")) == \
        [f"step-{s:07d}" for s in (10, 20, 30, 40)]


@pytest.mark.slow
def test_out_of_memory_on_one_rank_halves_the_micro_batch_on_both(runs, corpus, tmp_path):
    """Rank 1 alone fails in step 3's forward pass (from inside the model); both ranks redo the
    step at 2 x 2 instead of 4 x 1, and the run goes on as the uninterrupted one."""
    out = tmp_path / "oom"
    log = run(2, flags(out, runs / "cache", corpus), env={"TRAINER_INJECT_OOM": "3@1"})
    assert "out of memory in step 3: micro-batch 4 x 1 -> 2 x 2" in log, log[-3000:]
    with sqlite3.connect(f"{out}.db") as c:
        assert c.execute("SELECT status FROM runs").fetchall() == [("completed",)]
        events = [json.loads(d) for (d,) in c.execute("SELECT detail FROM events WHERE kind = 'oom'")]
    assert [(e["new_micro_batch"], e["new_grad_accum"]) for e in events] == [(2, 2)]    # recorded once
    assert "another process ran out of memory in step 3" in events[0]["error"]           # rank 0's view
    losses = step_losses(f"{out}.db")
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert_close(losses, step_losses(f"{runs / 'two'}.db"), range(1, STEPS + 1))


@pytest.mark.slow
def test_out_of_memory_in_the_last_backward_ends_the_run_naming_the_flags_that_continue_it(runs, corpus, tmp_path):
    """Rank 1 alone fails in step 12's backward, when rank 0 is in its gradient all-reduce: no
    redoing in place; the run ends, and the flags it names continue it like the uninterrupted run."""
    out = tmp_path / "oom-backward"
    args = flags(out, runs / "cache", corpus)
    log = run(2, args, expect=1, env={"TRAINER_INJECT_OOM_BACKWARD": "12@1"})
    fix = "--resume auto --micro-batch 2 --grad-accum 2"
    assert f"rank 1 ran out of memory in the backward pass of step 12" in log and fix in log, log[-3000:]
    assert not (out / "final_model").exists()
    resumed = run(2, args + fix.split())
    assert "resuming from" in resumed and "step-0000010" in resumed, resumed[-3000:]
    losses = step_losses(f"{out}.db")
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert_close(losses, step_losses(f"{runs / 'two'}.db"), range(1, STEPS + 1))


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(x) for x in text.split()]


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except (FileNotFoundError, IndexError):
        return True


def launch_until_first_checkpoint(args: list[str], out: Path) -> subprocess.Popen:
    """A 2-process run, returned once its step-10 checkpoint is complete (not after a sleep)."""
    proc = launch(2, args)
    while not (out / "checkpoints" / "step-0000010" / "manifest.json").exists():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.01)
    return proc


@pytest.mark.slow
def test_sigkill_of_the_launcher_then_resume_auto_ends_as_an_uninterrupted_run(runs, corpus, tmp_path):
    out = tmp_path / "killed"
    args = flags(out, runs / "cache", corpus)
    proc = launch_until_first_checkpoint(args, out)
    ranks = _children(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    # The ranks notice the launcher is gone (SIGTERM), agree to stop after the same step, and end.
    deadline = time.monotonic() + 120
    while not all(_gone(pid) for pid in ranks):
        assert time.monotonic() < deadline, "the ranks outlived their launcher"
        time.sleep(0.05)
    assert not (out / "final_model").exists(), "the run finished before it was killed"
    resumed = run(2, args + ["--resume", "auto"])
    assert "resuming from" in resumed
    a, b = weights(out), weights(runs / "two")
    assert all(torch.equal(a[k], b[k]) for k in b)


def _rank_of(pid: int) -> int:
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(v for v in env if v.startswith(b"RANK=")).split(b"=", 1)[1])


@pytest.mark.slow
def test_a_rank_that_dies_ends_the_run_with_its_checkpoint_and_resume_auto_continues(runs, corpus, tmp_path):
    out = tmp_path / "rank-died"
    args = flags(out, runs / "cache", corpus)
    proc = launch_until_first_checkpoint(args, out)
    rank1 = next(pid for pid in _children(proc.pid) if _rank_of(pid) == 1)
    os.kill(rank1, signal.SIGKILL)                     # rank 1 dies; rank 0 and the launcher live on
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, log[-3000:]
    # one line from the rank that lived, naming the fix; torchrun then names the rank that died
    assert "another training process stopped answering" in log and "--resume auto" in log, log[-3000:]
    assert "trainer.distributed.RankLost" not in log, log[-3000:]                 # no traceback of ours
    assert "rank      : 1 (local_rank: 1)" in log and "SIGKILL" in log, log[-3000:]
    assert not (out / "final_model").exists(), "the run finished although a rank died"
    with sqlite3.connect(f"{out}.db") as c:
        (status, reason), = c.execute("SELECT status, status_reason FROM runs").fetchall()
        saved = [s for (s,) in c.execute("SELECT step FROM checkpoints")]
    assert status == "failed" and "RankLost" in reason and 10 in saved, (status, reason, saved)
    resumed = run(2, args + ["--resume", "auto"])
    assert "resuming from" in resumed
    a, b = weights(out), weights(runs / "two")
    assert all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.slow
@pytest.mark.parametrize("nproc, source, accum", [(1, "two", 1), (2, "one", 2)])
def test_resume_with_another_number_of_processes_keeps_the_effective_batch(runs, corpus, tmp_path,
                                                                           nproc, source, accum):
    """2 -> 1 and 1 -> 2: from the step-20 checkpoint, the same flags; the losses go on as before."""
    out = tmp_path / "resumed"
    checkpoint = runs / source / "checkpoints" / "step-0000020"
    log = run(nproc, flags(out, runs / "cache", corpus, **{"grad-accum": accum, "resume": checkpoint}))
    assert "each optimizer step keeps its 8 sequences" in log
    resumed, original = step_losses(f"{out}.db"), step_losses(f"{runs / source}.db")
    assert sorted(resumed) == list(range(21, STEPS + 1))
    assert_close(resumed, original, range(21, STEPS + 1))

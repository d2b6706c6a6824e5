"""TensorBoard and W&B mirrors of real runs: real SQLite, real tensorboard, real wandb (offline).

What is checked is read back with each tool's own reader: TensorBoard's EventAccumulator,
and W&B's protobuf records in the offline run folders (expdb.mirrors.wandb_offline, since
wandb 0.31 has no Python reader of its own), with ``wandb sync --dry-run`` listing them.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

import expdb
from expdb.mirrors import (EVENT_MIRROR_FAILED, EVENT_MIRROR_LAGGED, MirroredRecorder, TensorBoardMirror,
                           WandbMirror, check_report_to, mirrors_for, offline_fragments, parse_report_to,
                           read_offline_run, replay)
from trainer.errors import ConfigError, StopTraining
from trainer.recorder import RunInfo

pytest.importorskip("tensorboard", reason="the mirror tests need tensorboard (pip install tensorboard)")
pytest.importorskip("wandb", reason="the mirror tests need wandb (pip install wandb)")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

STEP_METRICS = ("loss", "lr", "grad_norm", "tokens_per_s")


@pytest.fixture(autouse=True)
def wandb_offline(tmp_path, monkeypatch):
    """W&B with no network and nothing written outside tmp_path."""
    for name, value in dict(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=tmp_path / "wandb-home",
                            WANDB_CONFIG_DIR=tmp_path / "wandb-config", WANDB_CACHE_DIR=tmp_path / "wandb-cache",
                            WANDB_DATA_DIR=tmp_path / "wandb-data").items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("RANK", raising=False)


@pytest.fixture
def db(tmp_path):
    with expdb.open(tmp_path / "experiments.db") as database:
        yield database


def run_info(out_dir, study=None, trial=None, **extra):
    return RunInfo(name="mirrored" if trial is None else f"{study}/trial-{trial}",
                   config={"lr": 3e-3, "n_layer": 1, "out_dir": str(out_dir), "micro_batch": 8},
                   dataset={"source": "test"}, tokenizer={"kind": "bpe"}, n_params=1000, device="cpu",
                   precision="fp32", host="test", study_name=study, trial_number=trial, extra=extra)


def loss_of(session, step):
    # Each session's losses differ, so the read-back shows which session a step came from.
    return session * 10.0 + 1.0 / step


def drive(rec, session, steps, *, eval_every=10, checkpoint_at=(), epoch_ends=()):
    """The trainer's call sequence: steps, evaluations, checkpoints and epoch summaries."""
    for step in steps:
        rec.log_step(step, {"loss": loss_of(session, step), "lr": 1e-3, "grad_norm": 0.5,
                            "tokens_per_s": 1000.0, "epoch": 0, "tokens_seen": step * 256})
        if step % eval_every == 0:
            rec.log_eval(step, 0, {"val_loss": 2.0 + 1.0 / step, "val_ppl": 8.0})
        if step in checkpoint_at:
            rec.log_checkpoint(f"ckpt/step-{step}", "periodic", step, 2.0, 4096, "ab" * 32)
        if step in epoch_ends:
            rec.log_epoch(epoch_ends.index(step), {"step": step, "train_loss": 2.5, "val_loss": 2.1})


def mirrored(db, out_dir, warnings, **options):
    return MirroredRecorder(db.recorder(), mirrors_for("wandb,tensorboard", out_dir), lookup=db.run,
                            warn=warnings.append, **options)


def tb_scalars(log_dir, tag):
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}, [e.step for e in acc.Scalars(tag)], acc


def event_kinds(db, run_id):
    return list(db.events(run_id)["kind"])


# -- an interrupted and resumed run -----------------------------------------------------
def test_a_resumed_run_is_mirrored_once_per_step_into_the_same_runs(db, tmp_path):
    out, warnings = tmp_path / "run", []
    first = mirrored(db, out, warnings)
    run_id = first.start_run(run_info(out))
    drive(first, 1, range(1, 26), checkpoint_at=(20,), epoch_ends=(15,))
    first.finish("interrupted", "signal SIGTERM")      # steps 21-25 were logged after the checkpoint

    second = mirrored(db, out, warnings)
    second.start_run(run_info(out, run_id=run_id, resume_step=20))
    drive(second, 2, range(21, 41), epoch_ends=(30, 40))
    second.finish("completed")

    assert warnings == [] and db.run(run_id).status == "completed"
    # TensorBoard: every step exactly once; 21-25 from the resumed session (purge_step=21).
    values, steps, acc = tb_scalars(out / "tensorboard", "train/loss")
    assert steps == list(range(1, 41))
    assert all(values[s] == pytest.approx(loss_of(1 if s <= 20 else 2, s)) for s in steps)
    assert [e.step for e in acc.Scalars("val/loss")] == [10, 20, 30, 40]
    assert [e.step for e in acc.Scalars("epoch/train_loss")] == [15, 30, 40]
    assert {"config/text_summary", "checkpoints/text_summary"} <= set(acc.Tags()["tensors"])
    # W&B: two offline fragments of ONE run whose id is the database run's uid.
    uid = db.run(run_id).uid
    fragments = [read_offline_run(f) for f in offline_fragments(out, uid)]
    assert len(fragments) == 2 and {f.run_id for f in fragments} == {uid}
    assert all(f.config["lr"] == 3e-3 and f.config["n_layer"] == 1 for f in fragments)
    drawn = fragments[0].steps + fragments[1].steps
    assert sorted(set(drawn)) == list(range(1, 41)) and len(drawn) == len(set(drawn))   # once each
    assert fragments[1].steps[0] == 26          # 21-25 were already in the W&B run: not sent again
    assert fragments[0].summary["checkpoint/periodic"]["sha256"] == "ab" * 32
    assert fragments[1].summary["status"] == "completed" and fragments[1].exit_code == 0
    train_loss = {row["_step"]: row["train/loss"] for f in fragments for row in f.history if "train/loss" in row}
    assert train_loss[40] == pytest.approx(loss_of(2, 40))


def test_wandb_sync_sees_both_fragments_of_the_resumed_run(db, tmp_path):
    out, warnings = tmp_path / "run", []
    first = mirrored(db, out, warnings)
    run_id = first.start_run(run_info(out))
    drive(first, 1, range(1, 6))
    first.finish("interrupted", "signal SIGTERM")
    second = mirrored(db, out, warnings)
    second.start_run(run_info(out, run_id=run_id, resume_step=5))
    drive(second, 2, range(6, 11))
    second.finish("completed")
    uid = db.run(run_id).uid
    folders = [str(f.parent) for f in offline_fragments(out, uid)]
    shown = subprocess.run([sys.executable, "-m", "wandb", "sync", "--dry-run", *folders],
                           capture_output=True, text=True, timeout=120, env=os.environ.copy())
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.count(f"run-{uid}.wandb") + shown.stderr.count(f"run-{uid}.wandb") == 2


def _train():
    from trainer.run import train
    return train


class CrashAt:
    """Forwards to a recorder; raises at step ``at``, as a crash after a periodic checkpoint."""

    def __init__(self, inner, at):
        self.inner, self.at = inner, at

    def log_step(self, step, metrics):
        self.inner.log_step(step, metrics)
        if step == self.at:
            raise RuntimeError(f"simulated crash at step {step}")

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_the_real_trainer_crashed_and_resumed_is_mirrored_once_per_step(db, tiny_cfg, tiny_data):
    train = _train()
    cfg = tiny_cfg.replace(save_every=10, keep_checkpoints=5)
    warnings = []
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, CrashAt(mirrored(db, cfg.out_dir, warnings), at=25), data=tiny_data, log=lambda *_: None)
    run_id = int(db.runs()["id"].iloc[-1])
    assert db.run(run_id).status == "failed"
    result = train(cfg.replace(resume="auto"), mirrored(db, cfg.out_dir, warnings), data=tiny_data,
                   log=lambda *_: None)
    assert result.status == "completed" and warnings == []
    db_steps = list(db.steps(run_id)["step"])
    _, tb_steps, _ = tb_scalars(f"{cfg.out_dir}/tensorboard", "train/loss")
    assert tb_steps == db_steps == list(range(1, db_steps[-1] + 1))
    uid = db.run(run_id).uid
    fragments = [read_offline_run(f) for f in offline_fragments(cfg.out_dir, uid)]
    drawn = [s for f in fragments for s in f.steps]
    assert len(fragments) == 2 and {f.run_id for f in fragments} == {uid}
    assert sorted(set(drawn)) == db_steps and len(drawn) == len(set(drawn))
    assert fragments[0].config["out_dir"] == cfg.out_dir
    # Steps 21-25 were replaced: the database resumed from the step-20 checkpoint.
    resumes = db.events(run_id).query("kind == 'resume'")["detail"]
    assert [d["resume_step"] for d in resumes] == [20]
    assert fragments[0].steps[-1] == 25 and fragments[1].steps[0] == 26


# -- a mirror never breaks a run ----------------------------------------------------------
def test_a_missing_package_switches_the_mirror_off_with_one_warning(db, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)     # what `import wandb` sees when it is not installed
    out, warnings = tmp_path / "run", []
    rec = mirrored(db, out, warnings)
    run_id = rec.start_run(run_info(out))
    drive(rec, 1, range(1, 31))
    rec.finish("completed")
    assert db.run(run_id).status == "completed" and len(db.steps(run_id)) == 30
    assert len(warnings) == 1 and "wandb mirror switched off" in warnings[0] and "pip install wandb" in warnings[0]
    failed = db.events(run_id).query("kind == @EVENT_MIRROR_FAILED")
    assert len(failed) == 1
    assert failed["detail"].iloc[0]["mirror"] == "wandb" and "pip install wandb" in failed["detail"].iloc[0]["fix"]
    assert tb_scalars(out / "tensorboard", "train/loss")[1] == list(range(1, 31))     # the other mirror went on


def test_a_folder_that_cannot_be_created_switches_tensorboard_off(db, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the run folder should be")     # as root, chmod would not stop a write
    warnings = []
    rec = MirroredRecorder(db.recorder(), [TensorBoardMirror(blocker / "tensorboard")], lookup=db.run,
                           warn=warnings.append)
    run_id = rec.start_run(run_info(tmp_path / "run"))
    drive(rec, 1, range(1, 21))
    rec.finish("completed")
    assert db.run(run_id).status == "completed"
    assert len(warnings) == 1 and "tensorboard mirror switched off" in warnings[0]
    assert event_kinds(db, run_id).count(EVENT_MIRROR_FAILED) == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder anyway")
def test_a_read_only_folder_switches_tensorboard_off(db, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    warnings = []
    rec = MirroredRecorder(db.recorder(), [TensorBoardMirror(locked / "tb")], lookup=db.run, warn=warnings.append)
    run_id = rec.start_run(run_info(tmp_path / "run"))
    drive(rec, 1, range(1, 11))
    rec.finish("completed")
    assert len(warnings) == 1 and "writable" in warnings[0]
    assert event_kinds(db, run_id).count(EVENT_MIRROR_FAILED) == 1


class BlockingMirror:
    """A mirror (the Mirror protocol, no tracker behind it) whose calls wait for ``release``."""

    name = "blocking"

    def __init__(self):
        self.release, self.calls, self.threads = threading.Event(), [], set()

    def __getattr__(self, method):
        if method.startswith("_"):
            raise AttributeError(method)

        def call(*args):
            self.threads.add(threading.get_ident())
            self.release.wait(timeout=30)
            self.calls.append(method)
        return call

    def fix_for(self, exc):
        return "none needed"


def test_mirror_calls_run_off_the_training_thread(db, tmp_path):
    mirror = BlockingMirror()
    rec = MirroredRecorder(db.recorder(), [mirror], lookup=db.run, warn=pytest.fail)
    rec.start_run(run_info(tmp_path))
    drive(rec, 1, range(1, 101))            # would wait 30 s per call on this thread
    assert mirror.calls == []               # the mirror is still stuck in open()
    mirror.release.set()
    rec.finish("completed")
    assert mirror.calls.count("step") == 100 and mirror.calls[0] == "open" and mirror.calls[-1] == "close"
    assert threading.get_ident() not in mirror.threads


def test_finish_waits_a_bounded_time_for_a_stuck_mirror(db, tmp_path):
    mirror, warnings = BlockingMirror(), []
    rec = MirroredRecorder(db.recorder(), [mirror], lookup=db.run, warn=warnings.append, finish_timeout_s=0.2)
    run_id = rec.start_run(run_info(tmp_path))
    drive(rec, 1, range(1, 11))
    rec.finish("completed")                 # returns although the mirror never got past open()
    mirror.release.set()
    assert db.run(run_id).status == "completed"
    assert len(warnings) == 1 and "fell behind" in warnings[0]
    assert event_kinds(db, run_id).count(EVENT_MIRROR_LAGGED) == 1


class PrunedAt:
    """The database recorder with a pruner on top, as studies wrap it."""

    def __init__(self, inner, step):
        self.inner, self.step = inner, step

    def log_eval(self, step, epoch, metrics):
        self.inner.log_eval(step, epoch, metrics)
        if step >= self.step:
            raise StopTraining("pruned", f"test pruner at step {step}")

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_stop_training_from_the_primary_propagates_and_the_mirror_gets_the_evaluation(db, tmp_path):
    out, warnings = tmp_path / "run", []
    rec = MirroredRecorder(PrunedAt(db.recorder(), 20), mirrors_for("tensorboard", out), lookup=db.run,
                           warn=warnings.append)
    run_id = rec.start_run(run_info(out, study="s", trial=3))
    with pytest.raises(StopTraining, match="test pruner at step 20"):
        drive(rec, 1, range(1, 31))
    rec.finish("pruned", "test pruner")
    assert db.run(run_id).status == "pruned" and warnings == []
    _, _, acc = tb_scalars(out / "tensorboard", "val/loss")
    assert [e.step for e in acc.Scalars("val/loss")] == [10, 20]
    # A study's trial: the HParams view, with the best validation loss as its metric.
    assert acc.Scalars("hparam/best_val_loss")[0].value == pytest.approx(2.0 + 1 / 20)
    assert "_hparams_/session_start_info" in acc.summary_metadata


# -- replay, the factory, the check --------------------------------------------------------
def test_replay_writes_a_recorded_run_once_even_when_run_twice(db, tmp_path):
    out = tmp_path / "run"
    rec = db.recorder(study_name="s", trial_number=1)
    run_id = rec.start_run(run_info(out, study="s", trial=1))
    drive(rec, 1, range(1, 31), checkpoint_at=(20,), epoch_ends=(30,))
    rec.finish("completed")
    export = tmp_path / "export"
    for _ in range(2):
        replay(db, [run_id], to="tensorboard", out_dir=export, log=lambda *_: None)
    (folder,) = list(export.iterdir())
    values, steps, acc = tb_scalars(folder, "train/loss")
    assert steps == list(range(1, 31)) and values[7] == pytest.approx(loss_of(1, 7))
    assert [e.step for e in acc.Scalars("epoch/train_loss")] == [30]
    replay(db, [run_id], to="wandb", out_dir=tmp_path / "wb", project="replayed", log=lambda *_: None)
    (fragment,) = [read_offline_run(f) for f in offline_fragments(tmp_path / "wb", db.run(run_id).uid)]
    assert fragment.steps == list(range(1, 31)) and fragment.project == "replayed"
    assert fragment.name == "trial-1" and fragment.group == "s" and fragment.config["lr"] == 3e-3


def test_gpu_columns_reach_both_mirrors_live_and_replayed_and_none_is_left_out(db, tmp_path):
    """An epoch of a GPU run (utilisation and memory sampled, no temperature or power: a board
    that reports neither) and one of a CPU run (all None), as trainer.loop sends them."""
    out, warnings = tmp_path / "run", []
    gpu = {"gpu_util_pct": 81.5, "gpu_util_max_pct": 99.0, "gpu_mem_used_mb": 7000.0, "gpu_temp_c": None,
           "gpu_power_w": None}
    rec = mirrored(db, out, warnings)
    run_id = rec.start_run(run_info(out))
    drive(rec, 1, range(1, 11))
    rec.log_epoch(0, {"step": 10, "train_loss": 2.5, **gpu})
    drive(rec, 1, range(11, 21))
    rec.log_epoch(1, {"step": 20, "train_loss": 2.4, **dict.fromkeys(gpu)})
    rec.finish("completed")
    replay(db, [run_id], to="tensorboard", out_dir=tmp_path / "export", log=lambda *_: None)
    (replayed,) = list((tmp_path / "export").iterdir())
    for log_dir in (out / "tensorboard", replayed):
        values, steps, acc = tb_scalars(log_dir, "epoch/gpu_util_pct")
        assert values == {10: 81.5} and tb_scalars(log_dir, "epoch/gpu_mem_used_mb")[0] == {10: 7000.0}
        assert not {"epoch/gpu_temp_c", "epoch/gpu_power_w"} & set(acc.Tags()["scalars"]), log_dir
    (fragment,) = [read_offline_run(f) for f in offline_fragments(out, db.run(run_id).uid)]
    rows = [row for row in fragment.history if "epoch/train_loss" in row]
    assert [row.get("epoch/gpu_util_pct") for row in rows] == [81.5, None]
    assert not any("epoch/gpu_temp_c" in row for row in rows) and warnings == []


def test_report_to_names_are_checked_with_the_flag_the_value_and_the_choices():
    assert parse_report_to("wandb, TensorBoard") == ["wandb", "tensorboard"]
    assert parse_report_to("none") == [] and parse_report_to(None) == []
    with pytest.raises(ConfigError, match=r"--report-to wandb,tensorbord: unknown tracker 'tensorbord'; "
                                          r"choose from none, tensorboard, wandb"):
        mirrors_for("wandb,tensorbord", "/tmp/x")
    assert [m.name for m in mirrors_for(["tensorboard", "wandb"], "/tmp/x")] == ["tensorboard", "wandb"]
    assert mirrors_for("wandb,tensorboard", "/tmp/x", rank=1) == []      # only rank 0 reports


def test_check_report_to_warns_instead_of_raising(tmp_path, monkeypatch):
    assert check_report_to("wandb,tensorboard", tmp_path / "run") == []
    blocker = tmp_path / "file"
    blocker.write_text("")
    problems = check_report_to("tensorboard", blocker / "run")
    assert len(problems) == 1 and "--report-to tensorboard" in problems[0]
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    problems = check_report_to("wandb", tmp_path / "run")
    assert any("not installed" in p and "pip install wandb" in p for p in problems)
    assert any("not logged in" in p and "WANDB_MODE=offline" in p for p in problems)


def test_the_wandb_run_id_is_the_run_uid_and_the_project_follows_the_study(db, tmp_path):
    rec = MirroredRecorder(db.recorder(), [WandbMirror()], lookup=db.run, warn=pytest.fail)
    run_id = rec.start_run(run_info(tmp_path / "t", study="my/study", trial=4))
    rec.finish("completed")
    (fragment,) = [read_offline_run(f) for f in offline_fragments(tmp_path / "t", db.run(run_id).uid)]
    assert (fragment.project, fragment.name, fragment.group) == ("my-study", "trial-4", "my/study")


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(args, cwd, env):
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env={**env, "PYTHONPATH": ROOT},
                          capture_output=True, text=True, timeout=600)


def test_the_command_line_mirrors_a_run_and_replays_it_later(tmp_path, data_cache):
    """python -m trainer --report-to ..., then python -m expdb export --to tensorboard: the wiring."""
    # WANDB_MODE=offline etc. from the autouse fixture; not the service an earlier test started in this process
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    flags = ["--preset", "quick", "--subset", "0.02", "--n-layer", "1", "--n-embd", "32", "--block-size", "32",
             "--max-steps", "12", "--eval-every", "6", "--progress", "false", "--cache-dir", str(data_cache)]
    trained = _cli(["trainer", *flags, "--out", "run", "--report-to", "tensorboard,wandb",
                    "--wandb-project", "cli-test"], tmp_path, env)
    assert trained.returncode == 0, trained.stderr
    assert "warning" not in trained.stderr.lower(), trained.stderr
    with expdb.open(str(tmp_path / "experiments.db")) as db:
        (run_id,) = db.runs()["id"].tolist()
        uid = db.run(run_id).uid
    _, steps, _ = tb_scalars(tmp_path / "run" / "tensorboard", "train/loss")
    assert steps == list(range(1, 13))
    (fragment,) = [read_offline_run(f) for f in offline_fragments(tmp_path / "run", uid)]
    assert fragment.project == "cli-test" and fragment.steps == list(range(1, 13))
    replayed = _cli(["expdb", "--db", "experiments.db", "export", str(run_id), "--to", "tensorboard",
                     "--out-dir", "tb"], tmp_path, env)
    assert replayed.returncode == 0, replayed.stderr
    (folder,) = list((tmp_path / "tb").iterdir())
    assert tb_scalars(folder, "train/loss")[1] == list(range(1, 13))
    bad = _cli(["expdb", "--db", "experiments.db", "export", str(run_id), "--to", "wandb", "--format", "csv"],
               tmp_path, env)
    assert bad.returncode == 2 and "not both" in bad.stderr


def test_bits_per_byte_word_perplexity_and_mfu_reach_both_mirrors_live_and_replayed(db, tmp_path):
    """Picked like val_loss (every number of the metrics dict); the summaries add best_val_bpb,
    the bpb of the best val_loss (step 20 here, not the lowest bpb)."""
    out, warnings = tmp_path / "run", []
    rec = mirrored(db, out, warnings)
    run_id = rec.start_run(run_info(out, study="s", trial=0))
    for step, (loss, bpb) in {10: (2.5, 0.9), 20: (2.0, 1.0), 30: (2.2, 0.8)}.items():
        rec.log_step(step, {"loss": loss, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 1000.0})
        rec.log_eval(step, 0, {"val_loss": loss, "val_ppl": 8.0, "val_bpb": bpb, "val_word_ppl": 40.0 + step})
    rec.log_epoch(0, {"step": 30, "train_loss": 2.3, "val_loss": 2.2, "val_bpb": 0.8, "mfu": 0.4})
    rec.finish("completed")
    assert db.run(run_id).best_val_bpb == 1.0
    replay(db, [run_id], to="tensorboard", out_dir=tmp_path / "export", log=lambda *_: None)
    (replayed,) = list((tmp_path / "export").iterdir())
    for log_dir in (out / "tensorboard", replayed):
        assert tb_scalars(log_dir, "val/bpb")[0] == pytest.approx({10: 0.9, 20: 1.0, 30: 0.8})
        assert tb_scalars(log_dir, "val/word_ppl")[0] == {10: 50.0, 20: 60.0, 30: 70.0}
        assert tb_scalars(log_dir, "epoch/mfu")[0] == pytest.approx({30: 0.4})
        assert list(tb_scalars(log_dir, "hparam/best_val_bpb")[0].values()) == [1.0], log_dir
    (fragment,) = [read_offline_run(f) for f in offline_fragments(out, db.run(run_id).uid)]
    assert [row["val/bpb"] for row in fragment.history if "val/bpb" in row] == [0.9, 1.0, 0.8]
    assert [row["epoch/mfu"] for row in fragment.history if "epoch/mfu" in row] == [0.4]
    assert fragment.summary["best_val_bpb"] == 1.0 and warnings == []

"""Interrupt a real run (a real signal, in-process) and resume it: the result must not change."""
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer.checkpoints import HISTORY_FILE, LATEST_FILE, MODEL_FILE, OPTIMIZER_FILE, read_info, save_checkpoint
from trainer.clock import SimulatedTime
from trainer.errors import CheckpointError, ConfigError, TrainingInterrupted
from trainer.recorder import (EVENT_CHECKPOINT_DELETED, EVENT_CORRUPT_CHECKPOINT, EVENT_RESUME_CHECKPOINT,
                              EVENT_SIGNAL, EVENT_TIME_BUDGET)
from trainer.run import train
from trainer_fixtures import ListRecorder, SignalAt

QUIET = dict(log=lambda *_: None)


@pytest.fixture(scope="module")
def exact_cfg(tiny_base_cfg):
    # Gradient accumulation and dropout: the scaler-free fp32 path, with RNG use on every step.
    return tiny_base_cfg.replace(micro_batch=4, grad_accum=2, dropout=0.1, save_every=10, keep_checkpoints=10)


@pytest.fixture(scope="module")
def reference(exact_cfg, tiny_data, tmp_path_factory):
    """The uninterrupted run: its per-step losses and final weights."""
    out = tmp_path_factory.mktemp("reference")
    rec = ListRecorder()
    train(exact_cfg.replace(out_dir=str(out)), rec, data=tiny_data, **QUIET)
    return rec.losses(), load_file(str(out / "final_model" / MODEL_FILE))


def interrupt(cfg, data, at, sig=signal.SIGTERM):
    rec = SignalAt(at, sig)
    with pytest.raises(TrainingInterrupted) as stop:
        train(cfg, rec, data=data, **QUIET)
    return rec, stop.value


def assert_same_weights(out_dir, expected):
    got = load_file(str(Path(out_dir) / "final_model" / MODEL_FILE))
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)


@pytest.mark.parametrize("k", [13, 30], ids=["mid-epoch", "epoch-boundary"])
def test_an_interrupted_run_resumes_bit_identically(exact_cfg, tiny_data, reference, tmp_path, k):
    cfg = exact_cfg.replace(out_dir=str(tmp_path / "run"))
    first, stop = interrupt(cfg, tiny_data, at=k)
    assert (stop.signal_name, stop.exit_code) == ("SIGTERM", 143)
    assert read_info(stop.checkpoint_path).step == k and first.finished == ("interrupted", "signal SIGTERM")
    assert (EVENT_SIGNAL, k, {"signal": "SIGTERM", "checkpoint": stop.checkpoint_path}) in first.events

    second = ListRecorder()
    result = train(cfg.replace(resume="auto"), second, data=tiny_data, **QUIET)
    assert result.status == "completed" and result.resumed_from == stop.checkpoint_path
    assert min(second.losses()) == k + 1
    assert {**first.losses(), **second.losses()} == reference[0]      # every step's loss, exactly
    assert_same_weights(tmp_path / "run", reference[1])
    assert second.info.extra["run_id"] == 7 and second.info.extra["resume_step"] == k


def test_ctrl_c_and_keyboard_interrupt_save_and_exit_130(exact_cfg, tiny_data, tmp_path):
    _, stop = interrupt(exact_cfg.replace(out_dir=str(tmp_path / "a")), tiny_data, at=7, sig=signal.SIGINT)
    assert (stop.signal_name, stop.exit_code, read_info(stop.checkpoint_path).kind) == ("SIGINT", 130, "emergency")
    _, stop = interrupt(exact_cfg.replace(out_dir=str(tmp_path / "b")), tiny_data, at=7, sig="KeyboardInterrupt")
    assert (stop.signal_name, stop.exit_code, read_info(stop.checkpoint_path).step) == ("KeyboardInterrupt", 130, 7)


def test_signal_handlers_are_restored_after_training(exact_cfg, tiny_data, tmp_path):
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    train(exact_cfg.replace(out_dir=str(tmp_path / "a"), max_steps=3), data=tiny_data, **QUIET)
    interrupt(exact_cfg.replace(out_dir=str(tmp_path / "b")), tiny_data, at=2)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_auto_resume_falls_back_past_truncated_and_corrupt_checkpoints(exact_cfg, tiny_data, reference, tmp_path):
    cfg = exact_cfg.replace(out_dir=str(tmp_path / "run"))
    first, stop = interrupt(cfg, tiny_data, at=45)
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step-*")) == [f"step-{s:07d}" for s in (10, 20, 30, 40, 45)]
    newest = ckpts / "step-0000045" / MODEL_FILE
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])          # a half-written file
    flipped = bytearray((ckpts / "step-0000040" / OPTIMIZER_FILE).read_bytes())
    flipped[-7] ^= 0x10                                                            # one bit, on disk
    (ckpts / "step-0000040" / OPTIMIZER_FILE).write_bytes(bytes(flipped))

    logs, second = [], ListRecorder()
    train(cfg.replace(resume="auto"), second, data=tiny_data, log=logs.append)
    corrupt = [(step, d["path"]) for kind, step, d in second.events if kind == EVENT_CORRUPT_CHECKPOINT]
    assert [Path(p).name for _, p in corrupt] == ["step-0000045", "step-0000040"]
    resumed = [d for kind, _, d in second.events if kind == EVENT_RESUME_CHECKPOINT]
    assert Path(resumed[0]["path"]).name == "step-0000030"
    assert any("truncated" in line for line in logs) and any("sha256" in line for line in logs)
    assert len(list(ckpts.glob("corrupt-step-*"))) == 2          # moved aside, not deleted
    assert {**first.losses(), **{s: v for s, v in second.losses().items()}} == reference[0]
    assert_same_weights(tmp_path / "run", reference[1])


def test_a_resumed_run_continues_its_database_row(exact_cfg, tiny_data, reference, tmp_path):
    import expdb

    db = expdb.open(tmp_path / "experiments.db")
    cfg = exact_cfg.replace(out_dir=str(tmp_path / "run"), keep_checkpoints=1)
    with pytest.raises(TrainingInterrupted):
        train(cfg, SignalAtDB(db.recorder(), at=23), data=tiny_data, **QUIET)
    train(cfg.replace(resume="auto"), db.recorder(), data=tiny_data, **QUIET)

    runs = db.runs()
    assert len(runs) == 1 and runs.iloc[0]["status"] == "completed" and runs.iloc[0]["resume_count"] == 1
    run_id = int(runs.iloc[0]["id"])
    steps = db.steps(run_id)
    assert list(steps["step"]) == list(range(1, 61))
    assert dict(zip(steps["step"], steps["loss"], strict=True)) == pytest.approx(reference[0], rel=0, abs=0)
    events = db.events(run_id)
    assert {"signal", "resume", EVENT_RESUME_CHECKPOINT, EVENT_CHECKPOINT_DELETED} <= set(events["kind"])
    ckpts = db.checkpoints(run_id)
    on_disk = {str(p.resolve()) for p in (tmp_path / "run" / "checkpoints").glob("step-*")}
    assert {str(db.resolve_path(p).resolve()) for p in ckpts[~ckpts["deleted"].astype(bool)]["path"]} == on_disk
    assert set(ckpts["kind"]) >= {"emergency", "final"} and (ckpts["sha256"].str.len() == 64).all()
    db.close()


class SignalAtDB:
    """A real DBRecorder that sends SIGTERM when step ``at`` is reported."""

    def __init__(self, inner, at):
        self.inner, self.at = inner, at

    def log_step(self, step, metrics):
        self.inner.log_step(step, metrics)
        if step == self.at:
            os.kill(os.getpid(), signal.SIGTERM)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_rotation_keeps_the_newest_and_the_best_and_records_deletions(exact_cfg, tiny_data, tmp_path):
    rec = ListRecorder()
    cfg = exact_cfg.replace(out_dir=str(tmp_path / "run"), save_every=5, keep_checkpoints=2, eval_every=10)
    train(cfg, rec, data=tiny_data, **QUIET)
    root = tmp_path / "run" / "checkpoints"
    written = [path for path, _, _ in rec.checkpoints]
    deleted = [d["path"] for kind, _, d in rec.events if kind == EVENT_CHECKPOINT_DELETED]
    left = sorted(str(p.resolve()) for p in root.glob("step-*"))
    assert sorted(set(written) - set(deleted)) == left
    best_step = min(rec.evals, key=lambda e: e[1])[0]
    steps_left = sorted(read_info(p).step for p in root.glob("step-*"))
    assert steps_left[-2:] == [55, 60] and (best_step in steps_left or best_step % 5)
    assert (root / LATEST_FILE).read_text().strip() == "step-0000060"
    history = json.loads((root / HISTORY_FILE).read_text())
    assert [e["step"] for e in history["checkpoints"]] == [s for _, _, s in rec.checkpoints]
    assert sorted(e["path"] for e in history["checkpoints"] if e["deleted_at"] is None) == left
    assert history["latest"] == "step-0000060" and history["run_id"] == 7


def test_the_checkpoint_resumed_from_outlives_the_first_new_save(exact_cfg, tiny_data, tmp_path):
    cfg = exact_cfg.replace(out_dir=str(tmp_path / "run"), keep_checkpoints=1)
    _, stop = interrupt(cfg, tiny_data, at=13)

    class Watch(ListRecorder):
        def log_checkpoint(self, path, kind, step, val_loss, size_bytes, sha256):
            super().log_checkpoint(path, kind, step, val_loss, size_bytes, sha256)
            self.resumed_existed = getattr(self, "resumed_existed", []) + [os.path.isdir(stop.checkpoint_path)]

    rec = Watch()
    train(cfg.replace(resume="auto"), rec, data=tiny_data, **QUIET)
    assert rec.resumed_existed[0] and not os.path.isdir(stop.checkpoint_path)


def test_auto_resume_with_nothing_to_resume_starts_fresh(exact_cfg, tiny_data, tmp_path):
    logs = []
    result = train(exact_cfg.replace(out_dir=str(tmp_path / "run"), resume="auto", max_steps=2),
                   data=tiny_data, log=logs.append)
    assert result.status == "completed" and result.resumed_from is None
    assert any("found no valid checkpoint" in line and "starting fresh" in line for line in logs)


def test_a_fresh_start_refuses_a_folder_that_holds_checkpoints(exact_cfg, tiny_data, tmp_path):
    cfg = exact_cfg.replace(out_dir=str(tmp_path / "run"), max_steps=3)
    train(cfg, data=tiny_data, **QUIET)
    before = sorted(str(p) for p in (tmp_path / "run").rglob("*"))
    with pytest.raises(ConfigError, match="--out .* already holds checkpoints.*--resume auto"):
        train(cfg, data=tiny_data, **QUIET)
    assert sorted(str(p) for p in (tmp_path / "run").rglob("*")) == before


def test_resume_warns_about_changed_settings(exact_cfg, tiny_data, tmp_path):
    cfg = exact_cfg.replace(out_dir=str(tmp_path / "run"))
    interrupt(cfg, tiny_data, at=5)
    logs, rec = [], ListRecorder()
    train(cfg.replace(resume="auto", lr=1e-3, max_steps=8), rec, data=tiny_data, log=logs.append)
    [detail] = [d for kind, _, d in rec.events if kind == EVENT_RESUME_CHECKPOINT]
    assert any(c.startswith("--lr is 0.001, the checkpoint was trained with 0.003") for c in detail["config_changes"])
    assert any(line.startswith("warning: --lr is 0.001") for line in logs)


def test_a_weights_only_checkpoint_resumes_with_a_warning_and_a_fresh_optimizer(exact_cfg, tiny_data, reference,
                                                                                 tmp_path):
    cfg = exact_cfg.replace(out_dir=str(tmp_path / "run"), save_optimizer_state=False)
    first, stop = interrupt(cfg, tiny_data, at=13)
    assert not (Path(stop.checkpoint_path) / OPTIMIZER_FILE).exists()
    logs, second = [], ListRecorder()
    train(cfg.replace(resume="auto"), second, data=tiny_data, log=logs.append)
    assert any("weights only" in line and "optimizer restarts" in line for line in logs)
    [detail] = [d for kind, _, d in second.events if kind == EVENT_RESUME_CHECKPOINT]
    assert detail["weights_only"] is True
    assert first.losses() == {s: v for s, v in reference[0].items() if s <= 13}
    # Step 14's loss comes from step 13's weights; from step 15 on the restarted optimizer shows.
    assert second.losses()[14] == reference[0][14] and second.losses()[15] != reference[0][15]


def test_resume_from_an_uploaded_dataset_directory(exact_cfg, tiny_data, reference, tmp_path):
    first, stop = interrupt(exact_cfg.replace(out_dir=str(tmp_path / "session1")), tiny_data, at=13)
    dataset = tmp_path / "kaggle" / "input" / "my-checkpoints"
    shutil.copytree(tmp_path / "session1" / "checkpoints", dataset / "checkpoints")
    other = exact_cfg.replace(out_dir=str(tmp_path / "other"), n_embd=64, max_steps=20)
    train(other, data=tiny_data, **QUIET)                         # a newer checkpoint of another model
    shutil.copytree(tmp_path / "other" / "checkpoints", dataset / "other-model")

    logs, second = [], ListRecorder()
    cfg = exact_cfg.replace(out_dir=str(tmp_path / "session2"), resume="auto", resume_from=[str(tmp_path / "kaggle")])
    train(cfg, second, data=tiny_data, log=logs.append)
    [detail] = [d for kind, _, d in second.events if kind == EVENT_RESUME_CHECKPOINT]
    assert Path(detail["path"]) == dataset / "checkpoints" / "step-0000013"
    assert len(detail["passed_over"]) == 2 and any("another model (--n-embd 64" in line for line in logs)
    assert {**first.losses(), **second.losses()} == reference[0]
    assert_same_weights(tmp_path / "session2", reference[1])


def test_a_time_budget_stops_before_the_limit_with_a_checkpoint(exact_cfg, tiny_data, tmp_path):
    # Simulated time, 0.05 s per optimizer step: the budget runs out at the same step on any machine.
    cfg = exact_cfg.replace(out_dir=str(tmp_path / "run"), epochs=200, time_budget="3s")
    rec, clock = ListRecorder(), SimulatedTime(step_s=0.05)
    result = train(cfg, rec, data=tiny_data, time_source=clock, **QUIET)
    elapsed = clock()
    assert result.status == "interrupted" and result.reason.startswith("time budget")
    assert elapsed < 3.0 and 0 < result.steps < 200 * 30
    assert read_info(result.final_checkpoint).step == result.steps and rec.finished[0] == "interrupted"
    assert EVENT_TIME_BUDGET in rec.event_kinds()
    again = train(cfg.replace(resume="auto", max_steps=result.steps + 2, time_budget=""), data=tiny_data, **QUIET)
    assert again.status == "completed" and again.resumed_from == result.final_checkpoint


def test_a_deadline_already_past_stops_before_the_first_step(exact_cfg, tiny_data, tmp_path):
    result = train(exact_cfg.replace(out_dir=str(tmp_path / "run"), deadline="2001-01-01T00:00"),
                   data=tiny_data, **QUIET)
    assert result.status == "interrupted" and result.steps == 0 and result.final_checkpoint is None


def test_save_on_eval_checkpoints_every_evaluation(exact_cfg, tiny_data, tmp_path):
    rec = ListRecorder()
    cfg = exact_cfg.replace(out_dir=str(tmp_path / "run"), save_every=0, save_on_eval=True, eval_every=10)
    train(cfg, rec, data=tiny_data, **QUIET)
    assert [s for _, _, s in rec.checkpoints] == [10, 20, 30, 40, 50, 60]
    best, kinds = float("inf"), []
    for _, loss in rec.evals[:-1]:
        kinds.append("best" if loss < best else "periodic")
        best = min(best, loss)
    assert [k for _, k, _ in rec.checkpoints] == kinds + ["final"]


def test_resume_of_a_missing_or_broken_path_is_a_clear_error(exact_cfg, tiny_data, tmp_path):
    with pytest.raises(ConfigError, match="--resume '.*nope': no such checkpoint directory"):
        train(exact_cfg.replace(resume=str(tmp_path / "nope")), data=tiny_data, **QUIET)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="--resume '.*empty'.*no manifest.json"):
        train(exact_cfg.replace(out_dir=str(tmp_path / "run"), resume=str(tmp_path / "empty")),
              data=tiny_data, **QUIET)
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_published_but_never_recorded_is_recorded_on_resume(exact_cfg, tiny_data, tmp_path):
    """SIGKILL between the rename and the recorder call leaves a checkpoint no history knows."""
    from trainer.model import build_model, build_optimizer
    from trainer.state import TrainState

    cfg = exact_cfg.replace(out_dir=str(tmp_path / "run"))
    interrupt(cfg, tiny_data, at=13)
    model = build_model(cfg, tiny_data.vocab_size, tiny_data.tokenizer.eos_token_id)
    orphan = save_checkpoint(tmp_path / "run" / "checkpoints" / "step-0000012", model=model,
                             optimizer=build_optimizer(model, cfg), scaler=torch.amp.GradScaler("cpu", enabled=False),
                             state=TrainState(step=12, micro_batch=4, grad_accum=2, run_id=7),
                             config=cfg.to_dict(), kind="periodic")
    rec = ListRecorder()
    train(cfg.replace(resume="auto", max_steps=14), rec, data=tiny_data, **QUIET)
    assert (str(orphan.path), "periodic", 12) in rec.checkpoints
    history = json.loads((tmp_path / "run" / "checkpoints" / HISTORY_FILE).read_text())
    assert str(orphan.path) in [e["path"] for e in history["checkpoints"]]


def test_a_checkpoint_recorded_but_never_renamed_into_place_is_marked_deleted(exact_cfg, tiny_data, tmp_path):
    """SIGKILL between the recorder call and the rename: the next resume sets the record straight."""
    cfg = exact_cfg.replace(out_dir=str(tmp_path / "run"))
    interrupt(cfg, tiny_data, at=13)
    root = tmp_path / "run" / "checkpoints"
    history = json.loads((root / HISTORY_FILE).read_text())
    ghost = dict(history["checkpoints"][-1], path=str(root / "step-0000015"), name="step-0000015", step=15)
    history["checkpoints"].append(ghost)
    (root / HISTORY_FILE).write_text(json.dumps(history))
    rec = ListRecorder()
    train(cfg.replace(resume="auto", max_steps=14), rec, data=tiny_data, **QUIET)
    assert (EVENT_CHECKPOINT_DELETED, 15, {"path": ghost["path"]}) in rec.events
    history = json.loads((root / HISTORY_FILE).read_text())
    assert [e["deleted_at"] is not None for e in history["checkpoints"] if e["step"] == 15] == [True]

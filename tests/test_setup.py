"""A run's set-up apart from its running (trainer.setup), on the CPU with the tiny model and data."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import trainer.setup
from trainer.batching import Batching
from trainer.checkpoints import MODEL_FILE, STATE_FILE, plan_resume
from trainer.device import place
from trainer.distributed import World
from trainer.errors import DataError
from trainer.run import train
from trainer.setup import setup
from trainer.step import train_step
from trainer_fixtures import STEPS_PER_EPOCH, ListRecorder

QUIET = {"log": lambda *_: None}


def set_up(cfg, data, lines=None):
    log = lines.append if lines is not None else QUIET["log"]
    return setup(cfg, data, place(cfg), World(), ListRecorder(), log, plan_resume(cfg))


def test_setup_builds_the_parts_and_takes_no_step(tiny_cfg, tiny_data):
    lines = []
    parts, state, notes = set_up(tiny_cfg, tiny_data, lines)
    assert state.step == 0 and state.epoch == 0 and notes == []
    assert state.batching == Batching(tiny_cfg.micro_batch, tiny_cfg.grad_accum, 1)
    assert (parts.steps_per_epoch, parts.total_steps) == (STEPS_PER_EPOCH, STEPS_PER_EPOCH * tiny_cfg.epochs)
    assert all(p.device == parts.device for p in parts.model.parameters())
    assert not parts.optimizer.state and all(p.grad is None for p in parts.model.parameters())
    # rank 0's checkpoint store, opened on out_dir/checkpoints, holding nothing yet
    assert parts.store is not None and parts.store.root == (Path(tiny_cfg.out_dir) / "checkpoints").resolve()
    assert parts.store.root.is_dir() and parts.store.latest_path is None
    assert parts.save("final", state, 0) is None           # nothing to save before a step
    assert parts.train_step is train_step                  # no fault armed: the step as it is
    assert parts.step_parts.model is parts.model and parts.step_parts.ddp is None
    assert any("memory" in line.lower() for line in lines)


def test_an_armed_fault_injector_wraps_the_step(tiny_cfg, tiny_data, monkeypatch):
    monkeypatch.setenv("TRAINER_INJECT_NAN", "2")
    parts, _, _ = set_up(tiny_cfg, tiny_data)
    assert parts.train_step is not train_step


def test_data_too_small_for_a_step_is_refused_before_a_model_is_built(tiny_cfg, tiny_data, monkeypatch):
    monkeypatch.setattr(trainer.setup, "build_model", lambda *a, **kw: pytest.fail("a model was built"))
    with pytest.raises(DataError, match="--micro-batch 4096"):
        set_up(tiny_cfg.replace(micro_batch=4096), tiny_data)


def test_resume_through_setup_restores_the_checkpoints_step_weights_and_notes(tiny_cfg, tiny_data, tmp_path):
    first = train(tiny_cfg.replace(epochs=1, max_steps=5), data=tiny_data, **QUIET)
    assert first.steps == 5
    cfg = tiny_cfg.replace(epochs=1, max_steps=5, lr=1e-3, out_dir=str(tmp_path / "more"),
                           resume=first.final_checkpoint)
    lines = []
    parts, state, notes = set_up(cfg, tiny_data, lines)
    assert state.step == 5 and state.run_id == first.run_id
    saved = load_file(str(Path(first.final_checkpoint) / MODEL_FILE))
    weights = parts.model.state_dict()
    assert all(torch.equal(weights[k], t) for k, t in saved.items())
    assert parts.optimizer.state                          # the checkpoint's moments, loaded
    assert len(notes) == 1 and notes[0].startswith("--lr is 0.001")    # the changed --lr, warned about
    assert f"resuming from {Path(first.final_checkpoint).resolve()}: named by --resume" in lines


def test_the_auto_micro_batch_probe_decides_the_states_batching(tiny_cfg, tiny_data, monkeypatch):
    asked = []

    def probe(model, blocks, placement, batching, log):
        asked.append(batching)
        return batching.with_micro_batch(2)
    monkeypatch.setattr(trainer.setup, "pick_micro_batch", probe)
    cfg = tiny_cfg.replace(auto_micro_batch=True, micro_batch=8, grad_accum=2)
    parts, state, _ = set_up(cfg, tiny_data)
    assert asked == [Batching(8, 2, 1)]
    assert state.batching == Batching(2, 8, 1)             # the same 16 sequences a step
    assert parts.total_steps == set_up(cfg.replace(auto_micro_batch=False), tiny_data).parts.total_steps


def test_the_run_ends_with_the_state_a_reload_put_in_place(tiny_cfg, tiny_data, monkeypatch):
    """A streak of non-finite steps reloads a checkpoint into a new state object: the final
    checkpoint and the result hold that one (the step reached, the halved lr scale)."""
    monkeypatch.setenv("TRAINER_INJECT_NAN", "6,7,8")
    cfg = tiny_cfg.replace(epochs=1, max_steps=12, max_nonfinite_steps=3, save_every=2, dropout=0.0)
    result = train(cfg, ListRecorder(), data=tiny_data, **QUIET)
    assert result.status == "completed" and result.steps == 12
    saved = json.loads((Path(result.final_checkpoint) / STATE_FILE).read_text())["train_state"]
    assert saved["step"] == 12 and saved["lr_scale"] == 0.5

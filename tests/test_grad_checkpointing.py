"""Gradient checkpointing, the memory ladder's last rung: decided on its own, then on real runs
with injected out-of-memory errors (TRAINER_INJECT_OOM, see trainer.memory)."""
import json
from pathlib import Path

import pytest

from dashboards.run_data import fetch_run_data
from dashboards.run_records import Marker
from trainer.errors import StopTraining
from trainer.faults import GRADIENT_CHECKPOINTING, HALVE_MICRO_BATCH, remedy_after_oom
from trainer.state import Split
from trainer_fixtures import ListRecorder
from trainer_fixtures import run_with_faults

OOM = "CPU out of memory (a test's)"


def remedy(split, checkpointing="auto", on=False):
    recorder = ListRecorder()
    return remedy_after_oom(split, 3, OOM, checkpointing=checkpointing, checkpointing_on=on, recorder=recorder,
                            log=lambda *_: None), recorder


def test_the_ladder_halves_the_micro_batch_first_then_checkpoints_then_gives_up():
    first, recorder = remedy(Split(4, 2))
    assert first == (HALVE_MICRO_BATCH, Split(2, 4), False)
    assert recorder.events[0][2]["remedy"] == HALVE_MICRO_BATCH
    second, recorder = remedy(Split(1, 8))
    assert second == (GRADIENT_CHECKPOINTING, Split(1, 8), True)
    assert recorder.events[0][2]["remedy"] == GRADIENT_CHECKPOINTING
    with pytest.raises(StopTraining, match="micro-batch 1 in step 3 with gradient checkpointing"):
        remedy(Split(1, 8), on=True)
    with pytest.raises(StopTraining, match="micro-batch 1 in step 3: .*--gradient-checkpointing auto"):
        remedy(Split(1, 8), checkpointing="false")


run = run_with_faults   # tests/trainer_fixtures.py


@pytest.fixture
def mb1_cfg(tiny_cfg):
    # fp32 and no dropout: with or without recomputation the gradients are the same.
    return tiny_cfg.replace(micro_batch=2, grad_accum=4, epochs=1, max_steps=8, dropout=0.0, precision="fp32")


def test_an_oom_at_micro_batch_one_completes_with_checkpointing_on(mb1_cfg, tiny_data, tmp_path, monkeypatch):
    plain, plain_db = run(mb1_cfg, tiny_data, tmp_path, "plain", monkeypatch)
    hit, db = run(mb1_cfg, tiny_data, tmp_path, "hit", monkeypatch, oom="3,5")
    assert hit.status == "completed" and hit.steps == plain.steps == 8
    ooms = db.events(hit.run_id).query("kind == 'oom'")
    assert list(ooms.step) == [3, 5]
    assert [(d["remedy"], d["new_micro_batch"]) for d in ooms.detail] == [(HALVE_MICRO_BATCH, 1),
                                                                         (GRADIENT_CHECKPOINTING, 1)]
    # the redone steps train as the plain run does: recomputation changes memory, not gradients
    losses = db.steps(hit.run_id).set_index("step").loss
    assert losses.to_numpy() == pytest.approx(plain_db.steps(plain.run_id).set_index("step").loss.to_numpy(),
                                              rel=1e-4)
    # a resume keeps it on: the checkpoint's state says so
    state = json.loads((Path(hit.final_checkpoint) / "trainer_state.json").read_text())
    assert state["train_state"]["gradient_checkpointing"] is True
    assert Marker(GRADIENT_CHECKPOINTING, 5.0) in fetch_run_data(db, hit.run_id).markers


def test_with_false_an_oom_at_micro_batch_one_fails_as_before(mb1_cfg, tiny_data, tmp_path, monkeypatch):
    cfg = mb1_cfg.replace(micro_batch=1, grad_accum=8, gradient_checkpointing="false")
    result, db = run(cfg, tiny_data, tmp_path, "off", monkeypatch, oom="3")
    assert result.status == "failed" and "out of memory at micro-batch 1 in step 3" in result.reason
    assert result.steps == 2 and db.run(result.run_id).status == "failed"


def test_true_turns_it_on_from_the_start(mb1_cfg, tiny_data, tmp_path, monkeypatch):
    result, db = run(mb1_cfg.replace(micro_batch=1, grad_accum=8, gradient_checkpointing="true"), tiny_data,
                     tmp_path, "on", monkeypatch, oom="3")
    assert result.status == "failed" and "with gradient checkpointing" in result.reason

"""The training loop on a tiny model and a slice of the default corpus, on the CPU."""
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer.checkpoints import MANIFEST_FILE, MODEL_FILE, verify_checkpoint
from trainer.errors import CheckpointError, DataError
from trainer.run import train
from trainer_fixtures import ListRecorder


def test_a_run_learns_and_reports_everything(tiny_cfg, tiny_data):
    rec = ListRecorder()
    result = train(tiny_cfg, rec, data=tiny_data)
    assert result.status == "completed" and result.run_id == 7 and rec.finished == ("completed", None)
    assert [s for s, _ in rec.steps] == list(range(1, result.steps + 1))
    first, last = rec.steps[0][1]["loss"], rec.steps[-1][1]["loss"]
    assert last < first - 1.0, (first, last)
    # evaluation every eval_every steps and at each epoch end, epoch rows with memory
    assert len(rec.epochs) == tiny_cfg.epochs
    assert rec.epochs[-1][1]["val_loss"] == pytest.approx(result.last_val_loss)
    assert rec.epochs[0][1]["mem_process_mb"] > 10
    assert math.isclose(rec.epochs[0][1]["val_ppl"], math.exp(rec.epochs[0][1]["val_loss"]), rel_tol=1e-9)
    assert rec.info.n_params > 0 and rec.info.precision == "fp32"
    # a checkpoint at the end of the first epoch (its evaluation was the best so far), a final one
    assert [(kind, step) for _, kind, step in rec.checkpoints] == [("best", 30), ("final", result.steps)]
    assert rec.checkpoints[-1][0] == result.final_checkpoint
    verify_checkpoint(result.final_checkpoint)


def test_runs_are_deterministic_on_the_cpu(tiny_cfg, tiny_data, tmp_path):
    a, b = ListRecorder(), ListRecorder()
    train(tiny_cfg.replace(out_dir=str(tmp_path / "a"), epochs=1), a, data=tiny_data)
    train(tiny_cfg.replace(out_dir=str(tmp_path / "b"), epochs=1), b, data=tiny_data)
    assert [m["loss"] for _, m in a.steps] == [m["loss"] for _, m in b.steps]
    wa = load_file(str(tmp_path / "a/final_model/model.safetensors"))
    wb = load_file(str(tmp_path / "b/final_model/model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_gradient_accumulation_matches_the_large_batch(tiny_cfg, tiny_data, tmp_path):
    """4 x 2 accumulated gives the same first-step loss as 8 x 1 (same sequences)."""
    big, acc = ListRecorder(), ListRecorder()
    base = tiny_cfg.replace(epochs=1, max_steps=3)
    train(base.replace(micro_batch=8, grad_accum=1, out_dir=str(tmp_path / "big")), big, data=tiny_data)
    train(base.replace(micro_batch=4, grad_accum=2, out_dir=str(tmp_path / "acc")), acc, data=tiny_data)
    for (_, m1), (_, m2) in zip(big.steps, acc.steps, strict=True):
        assert m1["loss"] == pytest.approx(m2["loss"], rel=1e-4)


def test_a_stop_request_ends_the_run_as_pruned(tiny_cfg, tiny_data):
    rec = ListRecorder(stop_at_eval=1)
    result = train(tiny_cfg, rec, data=tiny_data)
    assert result.status == "pruned" and "test pruner" in result.reason
    assert rec.finished[0] == "pruned"
    assert result.steps == tiny_cfg.eval_every and result.final_model is None


def test_a_failure_is_recorded_and_raised(tiny_cfg, tiny_data, monkeypatch):
    rec = ListRecorder()
    monkeypatch.setattr("trainer.loop.Trainer.evaluate", lambda self: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        train(tiny_cfg, rec, data=tiny_data)
    assert rec.finished[0] == "failed" and "ZeroDivisionError" in rec.finished[1]


def test_too_little_data_for_one_step_is_a_clear_error(tiny_cfg, tiny_data):
    with pytest.raises(DataError, match="--micro-batch 4096"):
        train(tiny_cfg.replace(micro_batch=4096), data=tiny_data)


def test_resume_from_the_final_checkpoint_restores_the_state(tiny_cfg, tiny_data, tmp_path):
    first = train(tiny_cfg.replace(epochs=1), data=tiny_data)
    more = train(tiny_cfg.replace(epochs=2, out_dir=str(tmp_path / "more")), data=tiny_data,
                 resume=first.final_checkpoint)
    assert more.steps == 2 * first.steps


def test_a_corrupt_checkpoint_is_refused(tiny_cfg, tiny_data):
    result = train(tiny_cfg.replace(epochs=1), data=tiny_data)
    weights = f"{result.final_checkpoint}/{MODEL_FILE}"
    blob = bytearray(open(weights, "rb").read())
    blob[-1] ^= 0xFF
    open(weights, "wb").write(bytes(blob))
    with pytest.raises(CheckpointError, match="sha256"):
        verify_checkpoint(result.final_checkpoint)
    (Path(result.final_checkpoint) / MANIFEST_FILE).unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        train(tiny_cfg, data=tiny_data, resume=result.final_checkpoint)

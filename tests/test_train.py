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
    losses = [m["loss"] for _, m in rec.steps]
    # A fresh model's logits are near 0: its first loss is about ln(vocab) on any machine. It then
    # learns: the last five steps' mean is below the first five's by 0.5 nat, half the drop seen
    # here (6.21 -> 5.10), far beyond what another CPU's rounding moves (a smooth descent, not a
    # divergence). One step's loss against a threshold had 0.05 nat to spare: not a thing to test.
    assert losses[0] == pytest.approx(math.log(tiny_data.vocab_size), abs=0.1), losses[0]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
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


def test_a_step_reads_the_device_once_and_logs_the_summed_micro_batch_losses(tiny_cfg, tiny_data, monkeypatch):
    """4 micro-batches: no .item() per micro-batch or for the gradient norm, one read of both per step."""
    import trainer.setup
    from trainer.loop import Trainer

    reads = {"item": 0, "tolist": 0}
    for name in reads:
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _name=name, _original=original, **kw):
            reads[_name] += 1
            return _original(self, *a, **kw)
        monkeypatch.setattr(torch.Tensor, name, counted)
    micro_losses = []
    original_loss_of = trainer.setup.micro_batch_loss

    def loss_of(*a, **kw):
        loss = original_loss_of(*a, **kw)
        micro_losses.append(loss.detach() / 4)     # its share of the step's loss, as the step divides it
        return loss
    monkeypatch.setattr(trainer.setup, "micro_batch_loss", loss_of)
    counting = Trainer.optimizer_step
    per_step = []

    def one_step(self, ids):
        before = dict(reads)
        result = counting(self, ids)
        per_step.append({k: reads[k] - before[k] for k in reads})
        return result
    monkeypatch.setattr(Trainer, "optimizer_step", one_step)
    rec = ListRecorder()
    train(tiny_cfg.replace(micro_batch=2, grad_accum=4, epochs=1, max_steps=3), rec, data=tiny_data)
    assert per_step == [{"item": 0, "tolist": 1}] * 3
    monkeypatch.undo()
    summed = [float(sum(micro_losses[4 * i:4 * i + 4])) for i in range(3)]   # the sum as a tensor, read once
    assert [m["loss"] for _, m in rec.steps] == summed


def test_the_optimizer_is_the_fused_adamw_on_the_cpu_too(tiny_cfg):
    from trainer.model import build_model, build_optimizer

    assert build_optimizer(build_model(tiny_cfg, 512, 0), tiny_cfg).defaults["fused"] is True


@pytest.mark.slow
def test_compile_builds_and_trains_a_tiny_model(tiny_cfg, tiny_data):
    """torch.compile on this CPU (about 40 s to compile on 2 loaded cores): the same losses as eager."""
    eager, compiled = ListRecorder(), ListRecorder()
    base = tiny_cfg.replace(epochs=1, max_steps=3)
    train(base, eager, data=tiny_data)
    train(base.replace(compile=True, out_dir=f"{tiny_cfg.out_dir}-compiled"), compiled, data=tiny_data)
    for (_, a), (_, b) in zip(eager.steps, compiled.steps, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)

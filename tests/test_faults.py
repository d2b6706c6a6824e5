"""Memory faults and non-finite losses, recovered in place, on the CPU through fault injection."""
import gc
import math

import pytest
import torch

from trainer.run import train
from trainer_fixtures import ListRecorder, run_with_faults


run = run_with_faults   # tests/trainer_fixtures.py


@pytest.fixture
def fault_cfg(tiny_cfg):
    # fp32 and no dropout: the same sequences give the same gradients, however they are split.
    return tiny_cfg.replace(micro_batch=8, grad_accum=2, epochs=1, max_steps=12, dropout=0.0, precision="fp32")


def test_injected_ooms_keep_the_effective_batch_and_every_sample(fault_cfg, tiny_data, tmp_path, monkeypatch):
    plain, plain_db = run(fault_cfg, tiny_data, tmp_path, "plain", monkeypatch)
    hit, hit_db = run(fault_cfg, tiny_data, tmp_path, "oom", monkeypatch, oom="3,7")
    small, small_db = run(fault_cfg.replace(micro_batch=2, grad_accum=8), tiny_data, tmp_path, "small", monkeypatch)
    assert hit.status == "completed" and hit.steps == plain.steps == 12
    events = hit_db.events(hit.run_id)
    ooms = events[events.kind == "oom"]
    assert list(ooms.step) == [3, 7]
    assert [(d["old_micro_batch"], d["old_grad_accum"], d["new_micro_batch"], d["new_grad_accum"])
            for d in ooms.detail] == [(8, 2, 4, 4), (4, 4, 2, 8)]
    # no sample lost or counted twice: the same tokens seen at every step as without faults
    assert list(hit_db.steps(hit.run_id).tokens_seen) == list(plain_db.steps(plain.run_id).tokens_seen)
    # after the recoveries the run trains like one started at micro-batch 2 x 8
    after = hit_db.steps(hit.run_id).set_index("step").loss.loc[7:]
    reference = small_db.steps(small.run_id).set_index("step").loss.loc[7:]
    assert after.to_numpy() == pytest.approx(reference.to_numpy(), rel=1e-4)


class GraphsAliveAtRemedy(ListRecorder):
    """At each ``oom`` event (recorded once the memory was freed, before the step is redone):
    how many live tensors still carry an autograd graph, as a failed pass's activations do."""

    def __init__(self):
        super().__init__()
        self.alive = []

    def log_event(self, kind, step, detail):
        if kind == "oom":
            self.alive.append(sum(issubclass(type(o), torch.Tensor) and o.grad_fn is not None for o in gc.get_objects()))
        super().log_event(kind, step, detail)


def test_the_failed_pass_holds_no_memory_when_the_step_is_redone(fault_cfg, tiny_data, monkeypatch):
    # The injected error is raised inside the model, its earlier blocks' activations alive, as a
    # real one is; a kept exception (its traceback) would keep them, and the redone step would
    # run out of the memory they hold.
    monkeypatch.setenv("TRAINER_INJECT_OOM", "2,5")
    recorder = GraphsAliveAtRemedy()
    result = train(fault_cfg.replace(max_steps=6), recorder, data=tiny_data)
    assert result.status == "completed" and recorder.event_kinds() == ["oom", "oom"]
    assert recorder.alive == [0, 0]


def test_out_of_memory_at_micro_batch_one_ends_the_run_with_a_checkpoint(fault_cfg, tiny_data, tmp_path, monkeypatch):
    # --gradient-checkpointing false: with auto the ladder's last rung rescues it (tests/test_grad_checkpointing.py)
    result, db = run(fault_cfg.replace(micro_batch=1, grad_accum=16, gradient_checkpointing="false"), tiny_data,
                     tmp_path, "mb1", monkeypatch, oom="3")
    assert result.status == "failed" and "out of memory at micro-batch 1 in step 3" in result.reason
    assert result.steps == 2 and result.final_checkpoint and result.final_checkpoint.endswith("step-0000002")
    record = db.run(result.run_id)
    assert record.status == "failed" and "micro-batch 1" in record.status_reason


def test_a_nan_streak_reloads_the_last_good_checkpoint_with_half_the_lr(fault_cfg, tiny_data, tmp_path, monkeypatch):
    cfg = fault_cfg.replace(max_nonfinite_steps=3, save_every=2, warmup_steps=0, schedule="constant")
    result, db = run(cfg, tiny_data, tmp_path, "nan", monkeypatch, nan="6,7,8")
    assert result.status == "completed" and result.steps == 12
    events = db.events(result.run_id)
    nonfinite = events[events.kind == "nonfinite"]
    assert list(nonfinite.step[:3]) == [6, 7, 8]
    reload = [d for d in nonfinite.detail if d.get("action") == "reload"]
    assert len(reload) == 1 and "step-0000004" in reload[0]["detail"] and reload[0]["lr_scale"] == 0.5
    steps = db.steps(result.run_id).set_index("step")
    # steps 5.. were redone from the step-4 checkpoint at half the (constant) learning rate
    assert steps.lr.loc[4] == pytest.approx(cfg.lr) and steps.lr.loc[5] == pytest.approx(cfg.lr / 2)
    assert all(math.isfinite(x) for x in steps.loss)  # the redone steps replaced the NaN ones


def test_a_second_streak_ends_the_run_as_diverged(fault_cfg, tiny_data, tmp_path, monkeypatch):
    cfg = fault_cfg.replace(max_nonfinite_steps=3, save_every=2)
    result, db = run(cfg, tiny_data, tmp_path, "div", monkeypatch, nan="6,7,8,10,11,12")
    assert result.status == "failed" and result.reason.startswith("diverged: 3 non-finite steps in a row")
    assert db.run(result.run_id).status == "failed"


def test_gradient_scaler_overflows_are_skipped_and_recorded(fault_cfg, tiny_data, tmp_path, monkeypatch):
    # The fp16 path's bookkeeping on the CPU: a real GradScaler, and gradients that overflow in
    # the first 3 optimizer steps (a backward hook on the embedding), as a fresh fp16 scale
    # overflows half precision on a GPU. The loss itself stays finite.
    import torch

    import trainer.setup
    from trainer.device import Placement

    monkeypatch.setattr(Placement, "grad_scaler", lambda self: torch.amp.GradScaler("cpu", init_scale=2.0 ** 16))
    backward_calls = []

    def build_overflowing_model(*args, **kwargs):
        model = build_model(*args, **kwargs)
        def overflow(grad):
            backward_calls.append(1)
            return grad * math.inf if len(backward_calls) <= 3 * fault_cfg.grad_accum else grad
        model.transformer.wte.weight.register_hook(overflow)
        return model

    build_model = trainer.setup.build_model
    monkeypatch.setattr(trainer.setup, "build_model", build_overflowing_model)
    result, db = run(fault_cfg, tiny_data, tmp_path, "scaler", monkeypatch)
    assert result.status == "completed" and result.steps == 12
    events = db.events(result.run_id)
    skips = events[events.kind == "scaler_skip"]
    assert list(skips.step) == [1, 2, 3]
    assert [(d["scale"], d["total"]) for d in skips.detail] == [(2.0 ** 15, 1), (2.0 ** 14, 2), (2.0 ** 13, 3)]
    assert not (events.kind == "nonfinite").any()    # the scaler's own skips are no divergence streak
    assert db.steps(result.run_id).loss.notna().all()


@pytest.mark.parametrize("split, checkpointing_on, names", [
    ((4, 2), False, "continue the run from its last checkpoint with --resume auto --micro-batch 2 --grad-accum 4"),
    ((1, 8), False, "with --resume auto --gradient-checkpointing true"),
    ((1, 8), True, "the model does not fit; use a smaller --block-size, --n-embd or --n-layer"),
])
def test_an_out_of_memory_past_the_all_reduce_names_what_continues_the_run(split, checkpointing_on, names):
    from trainer.errors import RankLost
    from trainer.faults import Split, oom_past_agreement

    lost = oom_past_agreement(Split(*split), 12, 1, "CUDA out of memory. Tried to allocate 2 GiB\nmore", checkpointing_on)
    assert isinstance(lost, RankLost)          # ends the run without entering another collective
    assert str(lost).startswith("rank 1 ran out of memory in the backward pass of step 12 "
                                "(CUDA out of memory. Tried to allocate 2 GiB), after the other ranks")
    assert names in str(lost) and ("--resume" not in str(lost)) == checkpointing_on


@pytest.mark.parametrize("step", [1, 3])   # 1: while AdamW creates its state; 3: a later update
def test_out_of_memory_after_the_scaler_unscaled_is_redone_at_half_the_micro_batch(step, fault_cfg, tiny_data,
                                                                                    tmp_path, monkeypatch):
    # fp16's bookkeeping on the CPU: a real, enabled GradScaler. The optimizer's step raises out of
    # memory after unscale_ (TRAINER_INJECT_OOM_UPDATE); redone without forgetting that unscale_
    # it raised "unscale_() has already been called", and at the first step AdamW met the state
    # it had half made.
    from trainer.device import Placement

    monkeypatch.setattr(Placement, "grad_scaler", lambda self: torch.amp.GradScaler("cpu", init_scale=2.0 ** 8))
    plain, plain_db = run(fault_cfg, tiny_data, tmp_path, "plain", monkeypatch)
    monkeypatch.setenv("TRAINER_INJECT_OOM_UPDATE", str(step))
    hit, hit_db = run(fault_cfg, tiny_data, tmp_path, "update", monkeypatch)
    assert hit.status == "completed" and hit.steps == plain.steps == 12, hit.reason
    events = hit_db.events(hit.run_id)
    ooms = events[events.kind == "oom"]
    assert list(ooms.step) == [step] and "TRAINER_INJECT_OOM_UPDATE" in ooms.detail.iloc[0]["error"]
    assert [(d["new_micro_batch"], d["new_grad_accum"]) for d in ooms.detail] == [(4, 4)]
    assert not (events.kind == "scaler_skip").any()          # the scale was kept, not backed off
    hit_loss = hit_db.steps(hit.run_id).set_index("step").loss
    plain_loss = plain_db.steps(plain.run_id).set_index("step").loss
    assert hit_loss.to_numpy() == pytest.approx(plain_loss.to_numpy(), rel=1e-4)

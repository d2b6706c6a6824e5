"""The optimizer step (trainer.step) shared by the trainer and the LR finder, the batching it
reads (trainer.batching), and the out-of-memory retries around it, on the CPU."""
import copy
import dataclasses

import numpy as np
import pytest
import torch

from trainer.batching import Batching, Split
from trainer.distributed import AgreedOutOfMemory, World
from trainer.model import build_model, build_optimizer, next_token_loss
from trainer.step import StepParts, train_step, with_micro_batch_retries
from trainer_fixtures import ListRecorder

CPU = torch.device("cpu")


# -- the batching -----------------------------------------------------------------------------
def test_a_batching_counts_its_sequences_and_halves_keeping_them():
    b = Batching(micro_batch=8, grad_accum=2, world_size=3)
    assert (b.per_rank, b.per_step) == (16, 48)
    assert b.halved() == Batching(4, 4, 3) and b.halved().halved().halved() == Batching(1, 16, 3)
    assert Batching(6, 1).halved() == Batching(3, 2)           # the largest up to half that divides 6
    assert Batching(5, 2).halved() == Batching(2, 5)
    with pytest.raises(ValueError):
        Batching(1, 4).halved()
    assert b.steps_per_epoch(100) == 2 and b.steps_per_epoch(47) == 0
    assert b.split == Split(8, 2) and Batching.of(Split(8, 2), 3) == b


def test_a_batching_for_another_number_of_processes_keeps_each_steps_sequences():
    assert Batching(4, 2, 2).for_world(1) == Batching(4, 4, 1)       # 2 -> 1: twice the accumulation
    assert Batching(4, 2, 1).for_world(2) == Batching(4, 1, 2)       # 1 -> 2: half
    assert Batching(4, 3, 1).for_world(2) == Batching(3, 2, 2)       # 6 each: the micro-batch that divides it
    assert Batching(4, 2, 1).for_world(3) is None
    assert all(b.for_world(n).per_step == b.per_step for b in (Batching(4, 6, 1),) for n in (1, 2, 3, 4, 6))


def test_a_batching_from_the_config_and_its_micro_batches(tiny_cfg):
    b = Batching.from_config(tiny_cfg.replace(micro_batch=2, grad_accum=3), world_size=2)
    assert b == Batching(2, 3, 2)
    assert [list(m) for m in b.micro_batches(np.arange(6))] == [[0, 1], [2, 3], [4, 5]]


# -- the step ---------------------------------------------------------------------------------
def tokens(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 512, (n, 33), generator=torch.Generator().manual_seed(seed))


def step_parts(cfg, model) -> StepParts:
    return StepParts(lambda batch: next_token_loss(model, batch), model, build_optimizer(model, cfg),
                     torch.amp.GradScaler("cpu", enabled=False), cfg.grad_clip, CPU)


@pytest.mark.parametrize("n_micro", [1, 4])
def test_micro_batches_give_the_update_of_one_big_batch(tiny_cfg, n_micro):
    cfg = tiny_cfg.replace(grad_clip=0.5)        # clipped: the norm must be that of the whole batch
    batch = tokens(8)
    models = [build_model(cfg, 512, 0) for _ in range(2)]
    whole, split = (train_step(step_parts(cfg, m), chunks, step=1)
                    for m, chunks in zip(models, ([batch], list(batch.chunk(n_micro)))))
    assert whole.updated and split.updated and not split.scaler_skipped
    assert split.loss == pytest.approx(whole.loss, rel=1e-5)
    assert split.grad_norm == pytest.approx(whole.grad_norm, rel=1e-4)
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in models[1].parameters())      # zeroed for the next step


def test_a_non_finite_loss_skips_the_update(tiny_cfg):
    model = build_model(tiny_cfg, 512, 0)
    before = copy.deepcopy(model.state_dict())
    parts = step_parts(tiny_cfg, model)
    nan_parts = dataclasses.replace(parts, loss_of=lambda batch: next_token_loss(model, batch) * np.nan)
    outcome = train_step(nan_parts, [tokens(4)], step=1)
    assert not outcome.updated and np.isnan(outcome.loss)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_out_of_memory_before_the_last_backward_is_agreed_and_the_step_stops_there(tiny_cfg):
    model = build_model(tiny_cfg, 512, 0)
    parts, seen = step_parts(tiny_cfg, model), []

    def loss_of(batch):
        seen.append(len(seen))
        if len(seen) == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (made up)")
        return next_token_loss(model, batch)
    with pytest.raises(AgreedOutOfMemory, match="made up"):
        train_step(dataclasses.replace(parts, loss_of=loss_of), list(tokens(8).chunk(4)), step=1)
    assert seen == [0, 1]            # the micro-batches after it were not run


def test_the_finder_and_the_trainer_take_the_same_first_step(tiny_cfg, tiny_data):
    from trainer.checkpoints import plan_resume
    from trainer.clock import StopClock
    from trainer.device import place
    from trainer.distributed import share
    from trainer.interrupts import StopRequests
    from trainer.loop import Trainer
    from trainer.lr_find import _batch_ids, _step
    from trainer.schedule import lr_at
    from trainer.setup import setup

    cfg = tiny_cfg.replace(micro_batch=2, grad_accum=4)
    placement, quiet = place(cfg), lambda *_: None
    parts, state, _ = setup(cfg, tiny_data, placement, World(), ListRecorder(), quiet, plan_resume(cfg))
    trainer = Trainer(parts, state, ListRecorder(), StopRequests(), StopClock.for_limits("", ""), log=quiet)
    model = copy.deepcopy(parts.model)           # the same initial weights
    ids = _batch_ids(parts.train_blocks, cfg, 0)
    assert list(ids) == list(share(trainer._next_sample_ids(), World()))     # the same first sequences
    finder_loss = _step(model, build_optimizer(model, cfg), placement.grad_scaler(), parts.train_blocks, ids,
                        cfg, placement, lr_at(0, cfg, parts.total_steps))
    result = trainer.optimizer_step(ids)
    assert result.loss == finder_loss
    for a, b in zip(parts.model.parameters(), model.parameters()):
        assert torch.equal(a, b)


# -- the out-of-memory retries ----------------------------------------------------------------
def test_out_of_memory_is_retried_with_the_smaller_batching_until_it_fits():
    tried, shrunk = [], []

    def step_at(batching):              # fits from micro-batch 2 down (accelerate's test, our ladder)
        tried.append(batching)
        if batching.micro_batch > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return "done"

    def smaller(batching, error):
        shrunk.append(error)
        return batching.halved()
    assert with_micro_batch_retries(step_at, Batching(8, 1), World(), smaller, None) == "done"
    assert tried == [Batching(8, 1), Batching(4, 2), Batching(2, 4)] and len(shrunk) == 2
    assert "Tried to allocate" in shrunk[0]


def test_other_errors_and_unagreed_out_of_memory_with_several_ranks_are_not_retried():
    def fails(exc):
        def step_at(_):
            raise exc
        return step_at

    never = lambda *_: pytest.fail("no retry")       # noqa: E731
    with pytest.raises(ValueError):
        with_micro_batch_retries(fails(ValueError("x")), Batching(8, 1), World(), never, never)
    lost = RuntimeError("lost")
    with pytest.raises(RuntimeError, match="lost"):
        with_micro_batch_retries(fails(torch.cuda.OutOfMemoryError("oom")), Batching(8, 1, 2), World(0, 0, 2),
                                 never, lambda *_: lost)

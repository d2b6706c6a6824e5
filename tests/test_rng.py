"""A run's random streams are its own: initial weights from its seed alone, dropout from its own
device's generator (trainer.rng), whatever another trial of the same process does meanwhile."""
import threading

import pytest
import torch

import trainer.model
from trainer.model import build_model
from trainer.rng import seed_device


def weights(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_initial_weights_depend_on_the_seed_alone_while_another_trial_starts(tiny_cfg, monkeypatch):
    alone = {seed: weights(build_model(tiny_cfg.replace(seed=seed), 64, 0)) for seed in (1, 2)}
    # Trial 1 pauses in the middle of its initialisation until trial 2 has built its model (or
    # half a second has passed, when trial 2 has to wait for trial 1: the fixed behaviour).
    second_done, paused = threading.Event(), []
    original = trainer.model.GPT2LMHeadModel

    def pausing(config):
        if threading.current_thread().name == "trial-1" and not paused:
            paused.append(torch.rand(1))                # half-way: the stream is in use
            second_done.wait(timeout=0.5)
        return original(config)

    monkeypatch.setattr(trainer.model, "GPT2LMHeadModel", pausing)
    built = {}

    def trial(seed):
        built[seed] = weights(build_model(tiny_cfg.replace(seed=seed), 64, 0))
        if seed == 2:
            second_done.set()

    first = threading.Thread(target=trial, args=(1,), name="trial-1")
    first.start()
    while not paused:                                   # trial 1 is inside its initialisation
        threading.Event().wait(0.01)
    second = threading.Thread(target=trial, args=(2,), name="trial-2")
    second.start()
    first.join()
    second.join()
    assert torch.equal(built[2], alone[2])
    # trial 1: its own seeded stream, one number (the pause's) drawn before its weights, nothing else
    config = build_model(tiny_cfg.replace(seed=1), 64, 0).config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        torch.rand(1)
        expected = weights(original(config))
    assert torch.equal(built[1], expected)


def test_building_a_model_leaves_the_global_cpu_stream_as_it_was(tiny_cfg):
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    build_model(tiny_cfg, 64, 0)
    assert torch.equal(torch.rand(4), expected)


def test_dropout_is_seeded_on_the_runs_gpu_alone(simulated_gpu):
    gpu = simulated_gpu("T4 x2")
    other = gpu.rng_states[0].clone()
    seed_device(torch.device("cuda", 1), 7)
    assert gpu.calls_named("generator.manual_seed", "manual_seed", "manual_seed_all") == [("generator.manual_seed", 1)]
    assert torch.equal(gpu.rng_states[0], other)         # the other trial's generator is untouched


def test_dropout_on_the_cpu_draws_from_the_run_seed():
    seed_device(torch.device("cpu"), 7)
    first = torch.rand(3)
    seed_device(torch.device("cpu"), 7)
    assert torch.equal(torch.rand(3), first)

"""The random streams of one run, and of no other run in the same process.

``torch.manual_seed`` seeds the one CPU generator and every GPU's generator. Two trials of a
study in one process (``--n-jobs 2 --devices cuda:0,cuda:1``) would then reseed each other's
dropout mid-run, and the initial weights would depend on which thread drew first. So:

- the model is initialised under a process-wide lock, from the CPU stream forked off the
  global one (``torch.random.fork_rng``) and seeded with the run's seed: the weights depend
  on the seed alone, and the global CPU stream is left as it was;
- dropout draws from the generator of the run's own device, seeded for the run (and, with
  several ranks, for each step: trainer.distributed.step_seed), never another GPU's.

Two trials on the *same* device share its generator (torch's dropout takes no generator of
its own): their masks interleave, as they do for CPU trials sharing the CPU generator.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

import torch

_INIT_LOCK = threading.Lock()     # one model initialisation at a time in this process


@contextmanager
def seeded_init(seed: int) -> Iterator[None]:
    """Within: the CPU generator starts from ``seed``; after: it is as it was before."""
    with _INIT_LOCK, torch.random.fork_rng(devices=[]):      # CPU only: no GPU is touched
        torch.default_generator.manual_seed(seed)
        yield


def seed_device(device: torch.device, seed: int) -> None:
    """Seed the generator that dropout on ``device`` draws from: the CPU's, or that GPU's alone."""
    if device.type != "cuda":
        torch.default_generator.manual_seed(seed)
        return
    torch.cuda.init()                 # default_generators is filled when CUDA initialises
    index = device.index if device.index is not None else torch.cuda.current_device()
    torch.cuda.default_generators[index].manual_seed(seed)

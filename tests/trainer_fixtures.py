"""Fixtures shared by the trainer, study and end-to-end tests (loaded from conftest.py)."""
import dataclasses

import pytest

from trainer.config import TrainConfig


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """One tokenizer and token cache for the whole session, as a user's repeated runs share one."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def tiny_base_cfg(data_cache):
    # 3% of the standard library's sources: ~330 KB of Python, a 512-token vocabulary.
    return TrainConfig(subset=0.03, vocab_size=512, n_layer=1, n_embd=32, n_head=2, block_size=32,
                       micro_batch=8, grad_accum=1, epochs=2, max_steps=0, eval_every=20, eval_batches=4,
                       lr=3e-3, warmup_steps=5, precision="fp32", progress=False, cache_dir=str(data_cache))


STEPS_PER_EPOCH = 30


@pytest.fixture(scope="session")
def full_tiny_data(tiny_base_cfg):
    from trainer.data import prepare_data

    return prepare_data(tiny_base_cfg, log=lambda *_: None)


@pytest.fixture(scope="session")
def tiny_data(tiny_base_cfg, full_tiny_data):
    """The training stream cut to 30 optimizer steps per epoch, so a 2-epoch run takes ~2 s."""
    keep = STEPS_PER_EPOCH * tiny_base_cfg.effective_batch * tiny_base_cfg.block_size + 1
    assert len(full_tiny_data.train) > keep, "the test corpus is smaller than expected"
    return dataclasses.replace(full_tiny_data, train=full_tiny_data.train[:keep])


@pytest.fixture
def tiny_cfg(tiny_base_cfg, tmp_path):
    return tiny_base_cfg.replace(out_dir=str(tmp_path / "run"))

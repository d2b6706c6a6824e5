"""Fixtures shared by the trainer, study and end-to-end tests (loaded from conftest.py)."""
import dataclasses
import os
import signal

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


class ListRecorder:
    """A Recorder that keeps what the trainer reports, to assert on it."""

    def __init__(self, stop_at_eval=None, run_id=7):
        self.steps, self.evals, self.epochs, self.checkpoints, self.events = [], [], [], [], []
        self.finished, self.info, self.stop_at_eval, self.run_id = None, None, stop_at_eval, run_id

    def start_run(self, info):
        self.info = info
        return self.run_id

    def log_step(self, step, metrics):
        self.steps.append((step, metrics))

    def log_eval(self, step, epoch, metrics):
        from trainer.errors import StopTraining

        self.evals.append((step, metrics["val_loss"]))
        if self.stop_at_eval is not None and len(self.evals) >= self.stop_at_eval:
            raise StopTraining("pruned", f"test pruner at step {step}")

    def log_epoch(self, epoch, metrics):
        self.epochs.append((epoch, metrics))

    def log_checkpoint(self, path, kind, step, val_loss, size_bytes, sha256):
        self.checkpoints.append((path, kind, step))

    def log_event(self, kind, step, detail):
        self.events.append((kind, step, detail))

    def finish(self, status, reason=None):
        self.finished = (status, reason)

    def losses(self):
        return {step: m["loss"] for step, m in self.steps}

    def event_kinds(self):
        return [kind for kind, _, _ in self.events]


def run_with_faults(cfg, data, tmp_path, name, monkeypatch, oom="", nan=""):
    """A run into its own database with TRAINER_INJECT_OOM / _NAN set (empty: none); (result, db)."""
    import expdb
    from trainer.run import train

    monkeypatch.setenv("TRAINER_INJECT_OOM", oom)
    monkeypatch.setenv("TRAINER_INJECT_NAN", nan)
    db = expdb.open(tmp_path / f"{name}.db")
    result = train(cfg.replace(out_dir=str(tmp_path / name)), db.recorder(), data=data, log=lambda *_: None)
    return result, db


class SignalAt(ListRecorder):
    """Sends ``sig`` to this very process when step ``at`` is reported (or raises KeyboardInterrupt)."""

    def __init__(self, at, sig=signal.SIGTERM):
        super().__init__()
        self.at, self.sig = at, sig

    def log_step(self, step, metrics):
        super().log_step(step, metrics)
        if step == self.at:
            if self.sig == "KeyboardInterrupt":
                raise KeyboardInterrupt
            os.kill(os.getpid(), self.sig)

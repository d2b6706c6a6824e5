"""The checkpoint format on real files: round trip, atomicity, corruption, pickles, rotation."""
import copy
import json
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from safetensors.torch import load_file

from trainer.checkpoints import (MANIFEST_FILE, MODEL_FILE, OPTIMIZER_FILE, RNG_FILE, STATE_FILE, CheckpointInfo,
                                 load_checkpoint, read_info, save_checkpoint, verify_checkpoint)
# Internals, tested on purpose: the manifest's keys, publishing, the background writer, rotation.
from trainer.checkpoints.capture import capture
from trainer.checkpoints.format import KEY_FILES, publish, sha256_file
from trainer.checkpoints.store import plan_rotation
from trainer.checkpoints.writer import BackgroundWriter
from trainer.config import TrainConfig
from trainer.errors import CheckpointError
from trainer.model import build_model, build_optimizer
from trainer.state import TrainState

CFG = TrainConfig(n_layer=1, n_embd=32, n_head=2, block_size=16, vocab_size=300, dropout=0.1)


_TRAINED = {}


def trained_parts(seed=0):
    """A real GPT-2 and AdamW after two steps, and an enabled gradient scaler with history (a copy)."""
    if seed not in _TRAINED:
        _TRAINED[seed] = _train_two_steps(seed)
    return copy.deepcopy(_TRAINED[seed])


def _train_two_steps(seed):
    model = build_model(CFG.replace(seed=seed), 300, 0)
    optimizer = build_optimizer(model, CFG)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1)
    for _ in range(2):
        ids = torch.randint(0, 300, (2, 17))
        loss = model(input_ids=ids[:, :-1], labels=ids[:, 1:]).loss
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
    return model, optimizer, scaler


def save(path, model, optimizer, scaler, step=2, kind="periodic", **state):
    return save_checkpoint(path, model=model, optimizer=optimizer, scaler=scaler, kind=kind,
                           state=TrainState(step=step, **state), config=CFG.to_dict())


def test_round_trip_restores_weights_optimizer_scaler_and_every_rng(tmp_path):
    model, optimizer, scaler = trained_parts()
    random.seed(5), np.random.seed(6), torch.manual_seed(7)
    saved = save(tmp_path / "c", model, optimizer, scaler, step=2, epoch=1, sample_pos=24,
                 epoch_losses=[3.5, float("nan")])
    expected_draws = (random.random(), np.random.rand(), torch.rand(3))
    expected_opt = optimizer.state_dict()

    model2, optimizer2, scaler2 = trained_parts(seed=1)     # different weights and moments
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    state, config = load_checkpoint(saved.path, model=model2, optimizer=optimizer2, scaler=scaler2)

    assert (state.step, state.epoch, state.sample_pos) == (2, 1, 24)
    assert state.epoch_losses[0] == 3.5 and np.isnan(state.epoch_losses[1]) and config == CFG.to_dict()
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    got_opt = optimizer2.state_dict()
    for idx, entry in expected_opt["state"].items():
        for key, t in entry.items():
            assert torch.equal(t, got_opt["state"][idx][key]), (idx, key)
    assert got_opt["param_groups"][0]["betas"] == pytest.approx(expected_opt["param_groups"][0]["betas"])
    assert scaler2.state_dict() == scaler.state_dict() and scaler.get_scale() != 65536.0
    draws = (random.random(), np.random.rand(), torch.rand(3))
    assert draws[:2] == expected_draws[:2] and torch.equal(draws[2], expected_draws[2])


def test_the_manifest_describes_every_file_and_the_checkpoint(tmp_path):
    model, optimizer, scaler = trained_parts()
    saved = save(tmp_path / "c", model, optimizer, scaler, step=9, kind="best",
                 last_val_loss=2.5, last_eval_step=9)
    manifest = json.loads((saved.path / MANIFEST_FILE).read_text())
    assert sorted(manifest[KEY_FILES]) == sorted([MODEL_FILE, OPTIMIZER_FILE, RNG_FILE, STATE_FILE])
    for name, entry in manifest[KEY_FILES].items():
        assert entry == {"bytes": (saved.path / name).stat().st_size, "sha256": sha256_file(saved.path / name)}
    info = read_info(saved.path)
    assert (info.step, info.kind, info.val_loss, info.weights_only) == (9, "best", 2.5, False)
    assert saved.sha256 == sha256_file(saved.path / MANIFEST_FILE)
    assert saved.size_bytes == sum(p.stat().st_size for p in saved.path.iterdir())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temporary left


def test_weights_only_checkpoint_has_no_optimizer_file(tmp_path):
    model, optimizer, scaler = trained_parts()
    saved = save(tmp_path / "c", model, None, scaler)
    assert not (saved.path / OPTIMIZER_FILE).exists() and read_info(saved.path).weights_only
    full = save(tmp_path / "full", model, optimizer, scaler)
    assert saved.size_bytes < full.size_bytes / 2


@pytest.mark.parametrize("damage,message", [
    ("truncate", "truncated"), ("flip", "sha256"), ("drop_manifest", "incomplete"), ("delete", "missing"),
    ("bad_manifest", "unreadable"),
])
def test_damaged_checkpoints_are_refused(tmp_path, damage, message):
    model, optimizer, scaler = trained_parts()
    path = save(tmp_path / "c", model, optimizer, scaler).path
    weights = path / MODEL_FILE
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "flip":
        blob = bytearray(weights.read_bytes())
        blob[len(blob) // 2] ^= 0x01
        weights.write_bytes(bytes(blob))
    elif damage == "drop_manifest":
        (path / MANIFEST_FILE).unlink()
    elif damage == "delete":
        weights.unlink()
    else:
        (path / MANIFEST_FILE).write_text('{"files": {')
    with pytest.raises(CheckpointError, match=message):
        verify_checkpoint(path)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path, model=model, optimizer=optimizer, scaler=scaler)


class Payload:
    """Unpickling this creates a marker file: the proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(path: Path, blob: bytes) -> None:
    """Replace the weights by ``blob`` and rewrite the manifest to match, as an attacker would."""
    (path / MODEL_FILE).write_bytes(blob)
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    manifest[KEY_FILES][MODEL_FILE] = {"bytes": len(blob), "sha256": sha256_file(path / MODEL_FILE)}
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_a_planted_pickle_is_refused_and_never_run(tmp_path, writer):
    model, optimizer, scaler = trained_parts()
    path = save(tmp_path / "c", model, optimizer, scaler).path
    marker = tmp_path / "pwned"
    if writer == "pickle":
        blob = pickle.dumps(Payload(marker))
    else:
        torch.save({"weights": Payload(marker)}, tmp_path / "evil.pt")
        blob = (tmp_path / "evil.pt").read_bytes()
    plant(path, blob)
    verify_checkpoint(path)            # the manifest matches: only the content gives it away
    with pytest.raises(CheckpointError, match="pickle.*never loaded"):
        load_checkpoint(path, model=model, optimizer=optimizer, scaler=scaler)
    assert not marker.exists()


def test_a_pickle_checkpoint_without_manifest_is_named_and_refused(tmp_path):
    model, optimizer, scaler = trained_parts()
    evil = tmp_path / "downloaded"
    evil.mkdir()
    marker = tmp_path / "pwned"
    (evil / "pytorch_model.bin").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(CheckpointError, match="pytorch_model.bin are pickle files, which are never loaded"):
        load_checkpoint(evil, model=model, optimizer=optimizer, scaler=scaler)
    assert not marker.exists()


def test_a_manifest_naming_paths_outside_the_checkpoint_is_refused(tmp_path):
    model, optimizer, scaler = trained_parts()
    path = save(tmp_path / "c", model, optimizer, scaler).path
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    manifest[KEY_FILES]["../../etc/passwd"] = {"bytes": 1, "sha256": "0"}
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="unsafe names"):
        verify_checkpoint(path)


def test_weights_of_another_model_are_refused_with_the_flags_to_fix(tmp_path):
    model, optimizer, scaler = trained_parts()
    path = save(tmp_path / "c", model, optimizer, scaler).path
    wider = build_model(CFG.replace(n_embd=64), 300, 0)
    with pytest.raises(CheckpointError, match="--n-layer/--n-embd"):
        load_checkpoint(path, model=wider, optimizer=None, scaler=scaler)


def test_background_writer_stalls_only_for_the_copy_and_saves_in_order(tmp_path):
    model, optimizer, scaler = trained_parts()
    writer = BackgroundWriter()
    args = dict(model=model, optimizer=optimizer, scaler=scaler, config={}, kind="periodic")
    writer.save(tmp_path / "a", lambda b: capture(buffers=b, state=TrainState(step=1), **args))
    with torch.no_grad():
        model.transformer.wte.weight.add_(1.0)      # training goes on while "a" is written
    writer.save(tmp_path / "b", lambda b: capture(buffers=b, state=TrainState(step=2), **args))
    outcomes = writer.drain()
    assert [o.info.step for o in outcomes] == [1, 2] and all(o.error is None for o in outcomes)
    assert not (tmp_path / "a").exists()          # written under a temporary name until published
    for outcome in outcomes:
        publish(outcome)
    wa, wb = load_file(str(tmp_path / "a" / MODEL_FILE)), load_file(str(tmp_path / "b" / MODEL_FILE))
    name = "transformer.wte.weight"
    assert torch.equal(wa[name] + 1.0, wb[name])   # each holds the weights of its own step
    assert writer.poll() == []


def test_a_failed_background_write_is_reported_not_raised_in_the_thread(tmp_path):
    model, optimizer, scaler = trained_parts()
    (tmp_path / "file").write_text("not a directory")
    writer = BackgroundWriter()
    writer.save(tmp_path / "file" / "c", lambda b: capture(buffers=b, model=model, optimizer=optimizer,
                                                           scaler=scaler, state=TrainState(step=1),
                                                           config={}, kind="periodic"))
    [outcome] = writer.drain()
    assert outcome.tmp is None and isinstance(outcome.error, OSError)


# -- rotation: which checkpoints to delete -------------------------------------------------
def stored(step, written_at=None, val_loss=None, size=100):
    return CheckpointInfo(step=step, epoch=0, kind="periodic", val_loss=val_loss, run_id=1, weights_only=False,
                          written_at=float(written_at if written_at is not None else step),
                          path=Path(f"step-{step}"), size_bytes=size, sha256="x")


def steps(records):
    return sorted(s.step for s in records)


def test_rotation_keeps_the_newest_and_the_best():
    found = [stored(s, val_loss={20: 1.0, 50: 2.0}.get(s)) for s in (10, 20, 30, 40, 50, 60, 70)]
    assert steps(plan_rotation(found, keep=4, max_bytes=0, protected=set())) == [10, 30]
    assert steps(plan_rotation(found, keep=1, max_bytes=0, protected=set())) == [10, 30, 40, 50, 60]


def test_rotation_spares_protected_checkpoints():
    found = [stored(s) for s in (10, 20, 30)]
    assert steps(plan_rotation(found, keep=1, max_bytes=0, protected={Path("step-10")})) == [20]


def test_rotation_orders_by_write_time_so_a_rewind_keeps_its_new_work():
    # Resumed from step 10 after 40 and 50 had been written: 12 and 14 are the newest.
    found = [stored(10, 1), stored(40, 4), stored(50, 5), stored(12, 6), stored(14, 7)]
    assert steps(plan_rotation(found, keep=2, max_bytes=0, protected=set())) == [10, 40, 50]


def test_disk_budget_deletes_the_oldest_but_never_the_newest_or_best():
    found = [stored(s, val_loss=1.0 if s == 10 else None, size=100) for s in (10, 20, 30, 40)]
    assert steps(plan_rotation(found, keep=4, max_bytes=250, protected=set())) == [20, 30]
    # a budget that even the newest and the best exceed deletes nothing more
    assert steps(plan_rotation(found, keep=4, max_bytes=50, protected=set())) == [20, 30]


def test_a_newer_format_version_is_refused(tmp_path):
    model, optimizer, scaler = trained_parts()
    path = save(tmp_path / "c", model, optimizer, scaler).path
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    manifest["format_version"] = 99
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="newer than this trainer"):
        verify_checkpoint(path)

"""Checkpoints: a directory of safetensors and JSON files with a manifest, written atomically.

A checkpoint exists only when its manifest is complete: it is written into a temporary
directory, every file fsynced, the manifest written last, and the directory renamed into
place. Nothing here unpickles: tensors are safetensors, everything else is JSON.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from trainer.errors import CheckpointError

# File names inside a checkpoint directory.
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1

# Keys of trainer_state.json.
KEY_FORMAT = "format_version"
KEY_STATE = "train_state"
KEY_CONFIG = "config"
KEY_OPTIMIZER_GROUPS = "optimizer_param_groups"
KEY_SCALER = "grad_scaler"
KEY_PY_RNG = "python_rng"
KEY_NP_RNG = "numpy_rng"
KEY_KIND = "kind"


@dataclass
class TrainState:
    """Where a run is: everything besides tensors that an exact resume needs."""

    step: int = 0                # optimizer steps completed
    epoch: int = 0               # epoch in progress (0-based)
    sample_pos: int = 0          # sequences of this epoch's order already consumed
    tokens_seen: int = 0
    micro_batch: int = 0
    grad_accum: int = 0
    best_val_loss: float = math.inf
    best_step: int = -1
    last_val_loss: float = math.nan
    run_id: int | None = None
    epoch_losses: list[float] = field(default_factory=list)  # step losses of the epoch in progress

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        # JSON has no inf/nan; keep them as strings so the file stays standard JSON.
        for k in ("best_val_loss", "last_val_loss"):
            d[k] = _float_to_json(d[k])
        d["epoch_losses"] = [_float_to_json(x) for x in d["epoch_losses"]]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "TrainState":
        d = dict(d)
        for k in ("best_val_loss", "last_val_loss"):
            d[k] = float(d[k])
        d["epoch_losses"] = [float(x) for x in d.get("epoch_losses", [])]
        return cls(**d)


@dataclass(frozen=True)
class SavedCheckpoint:
    path: Path
    size_bytes: int
    sha256: str      # of the manifest, which holds every file's sha256


def save_checkpoint(path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    scaler: torch.amp.GradScaler, state: TrainState, config: dict[str, Any],
                    kind: str) -> SavedCheckpoint:
    """Write a complete checkpoint at ``path`` (a directory), atomically."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / MODEL_FILE))
    groups = None
    if optimizer is not None:
        tensors, groups = _flatten_optimizer(optimizer.state_dict())
        save_file(tensors, str(tmp / OPTIMIZER_FILE))
    save_file(_torch_rng_tensors(), str(tmp / RNG_FILE))
    _write_json(tmp / STATE_FILE, {
        KEY_FORMAT: FORMAT_VERSION, KEY_KIND: kind, KEY_STATE: state.to_json(), KEY_CONFIG: config,
        KEY_OPTIMIZER_GROUPS: groups, KEY_SCALER: scaler.state_dict() if scaler.is_enabled() else None,
        KEY_PY_RNG: _python_rng_json(), KEY_NP_RNG: _numpy_rng_json(),
    })
    manifest = {name: _describe(tmp / name) for name in sorted(os.listdir(tmp))}
    _write_json(tmp / MANIFEST_FILE, {KEY_FORMAT: FORMAT_VERSION, "files": manifest})
    _fsync_dir(tmp)
    _replace_dir(tmp, path)
    size = sum(f["bytes"] for f in manifest.values()) + (path / MANIFEST_FILE).stat().st_size
    return SavedCheckpoint(path, size, _sha256(path / MANIFEST_FILE))


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Check every file against the manifest; return the manifest or raise CheckpointError."""
    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path}: no {MANIFEST_FILE}, so it is incomplete; "
                              "resume from an earlier checkpoint")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"checkpoint {path}: unreadable manifest ({exc})") from exc
    for name, expected in files.items():
        actual = path / name
        if not actual.is_file() or actual.stat().st_size != expected["bytes"]:
            raise CheckpointError(f"checkpoint {path}: {name} is missing or truncated")
        if _sha256(actual) != expected["sha256"]:
            raise CheckpointError(f"checkpoint {path}: {name} does not match its sha256 (corrupt)")
    return manifest


def load_checkpoint(path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    scaler: torch.amp.GradScaler) -> tuple[TrainState, dict[str, Any]]:
    """Restore model, optimizer, scaler and RNG states; return the train state and saved config."""
    path = Path(path)
    verify_checkpoint(path)
    meta = json.loads((path / STATE_FILE).read_text())
    missing, unexpected = load_model(model, str(path / MODEL_FILE), strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:
        raise CheckpointError(f"checkpoint {path}: weights do not fit this model "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]}); "
                              "resume with the same --n-layer/--n-embd/--n-head/--vocab-size")
    if optimizer is not None and (path / OPTIMIZER_FILE).is_file():
        optimizer.load_state_dict(_unflatten_optimizer(load_file(str(path / OPTIMIZER_FILE)),
                                                       meta[KEY_OPTIMIZER_GROUPS]))
    if meta.get(KEY_SCALER) and scaler.is_enabled():
        scaler.load_state_dict(meta[KEY_SCALER])
    _restore_rng(load_file(str(path / RNG_FILE)), meta)
    return TrainState.from_json(meta[KEY_STATE]), meta[KEY_CONFIG]


# -- optimizer state <-> flat tensors + JSON ---------------------------------------------
def _flatten_optimizer(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    tensors = {f"state.{idx}.{name}": t.detach().cpu().contiguous()
               for idx, entry in sd["state"].items() for name, t in entry.items()}
    return tensors, sd["param_groups"]


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]]) -> dict[str, Any]:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = t
    return {"state": state, "param_groups": groups}


# -- random number generators ----------------------------------------------------------
def _torch_rng_tensors() -> dict[str, torch.Tensor]:
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"torch_cuda_{i}"] = s
    return out


def _python_rng_json() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _numpy_rng_json() -> list[Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta[KEY_PY_RNG]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = meta[KEY_NP_RNG]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# -- files ----------------------------------------------------------------------------
def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def _describe(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename tmp to final; an older directory of that name is moved aside first, then removed."""
    old = final.with_name(f".old-{final.name}-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def _float_to_json(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)

"""The checkpoint format: a directory of safetensors and JSON files with a manifest.

A checkpoint exists only when its manifest is complete: the files are written into a
temporary directory and fsynced, the manifest (every file's size and sha256) is written
last, and the directory is renamed into place. Nothing here unpickles: tensors are
safetensors, everything else is JSON, and a file that looks like a pickle is refused
before anything reads it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from trainer.errors import CheckpointError

FORMAT_VERSION = 1

# File names inside a checkpoint directory.
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
REQUIRED_FILES = (MODEL_FILE, RNG_FILE, STATE_FILE)

# Keys of manifest.json.
KEY_FORMAT = "format_version"
KEY_FILES = "files"
KEY_CHECKPOINT = "checkpoint"      # a CheckpointInfo
KEY_BYTES = "bytes"
KEY_SHA256 = "sha256"

# Keys of trainer_state.json.
KEY_STATE = "train_state"
KEY_CONFIG = "config"
KEY_OPTIMIZER_GROUPS = "optimizer_param_groups"
KEY_SCALER = "grad_scaler"
KEY_PY_RNG = "python_rng"
KEY_NP_RNG = "numpy_rng"
KEY_KIND = "kind"

# Names of directories in a checkpoints folder.
STEP_PREFIX = "step-"
TMP_PREFIX = ".tmp-"               # being written; never a checkpoint
OLD_PREFIX = ".old-"               # replaced, being removed
KINDS = ("periodic", "best", "emergency", "final")

# The first bytes of files that must never reach a loader: pickle protocols 2-5 and
# torch.save's zip archive (a pickle inside).
_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint is, kept in its manifest so that listing needs no hashing."""

    step: int
    epoch: int
    kind: str
    val_loss: float | None      # measured at this very step, else None
    run_id: int | None
    weights_only: bool          # no optimizer state: a resume restarts AdamW
    written_at: float = 0.0     # unix time the manifest was written: orders checkpoints


@dataclass
class Snapshot:
    """A checkpoint's content in host memory, ready to be written by any thread."""

    tensors: dict[str, dict[str, torch.Tensor]]   # file name -> tensor name -> tensor
    state: dict[str, Any]                         # trainer_state.json
    info: CheckpointInfo


@dataclass(frozen=True)
class SavedCheckpoint:
    path: Path
    info: CheckpointInfo
    size_bytes: int
    sha256: str      # of the manifest, which holds every file's sha256
    seconds: float   # how long the write took
    tmp: Path | None = None   # where it waits until published (None once it is)


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:07d}"


# -- writing ---------------------------------------------------------------------------
def write_checkpoint(path: Path, snapshot: Snapshot) -> SavedCheckpoint:
    """Write ``snapshot`` as the checkpoint directory ``path``, atomically; replaces one there."""
    return publish(prepare_checkpoint(path, snapshot))


def prepare_checkpoint(path: Path, snapshot: Snapshot) -> SavedCheckpoint:
    """Write and fsync every file under a temporary name beside ``path``; ``publish`` renames it.

    The slow part, safe in any thread. Until published it is not a checkpoint (its name
    starts with a dot, and a restart removes it).
    """
    start = time.perf_counter()
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{os.getpid()}-{threading.get_ident()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for name, tensors in snapshot.tensors.items():
            save_file(tensors, str(tmp / name), metadata={"format": "pt"})
        _write_json(tmp / STATE_FILE, snapshot.state)
        files = {name: _describe(tmp / name) for name in sorted(os.listdir(tmp))}
        # A fresh capture has no time yet; an imported checkpoint keeps the one it was written at.
        info = snapshot.info if snapshot.info.written_at else replace(snapshot.info, written_at=time.time())
        _write_json(tmp / MANIFEST_FILE, {KEY_FORMAT: FORMAT_VERSION, KEY_CHECKPOINT: asdict(info),
                                          KEY_FILES: files})
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(f[KEY_BYTES] for f in files.values()) + (tmp / MANIFEST_FILE).stat().st_size
    return SavedCheckpoint(path, info, size, sha256_file(tmp / MANIFEST_FILE), time.perf_counter() - start,
                           tmp=tmp)


def publish(prepared: SavedCheckpoint) -> SavedCheckpoint:
    """Rename a prepared checkpoint into place: from this moment on it exists."""
    _replace_dir(prepared.tmp, prepared.path)
    return replace(prepared, tmp=None)


def write_json_atomic(path: Path, obj: Any, durable: bool = True) -> None:
    """Replace ``path`` by ``obj`` as JSON: readers see the old file or the new, never half."""
    write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True, allow_nan=False), durable)


def write_text_atomic(path: Path, text: str, durable: bool = True) -> None:
    """Atomic replace; ``durable`` also fsyncs, so that a power cut cannot undo it."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{os.getpid()}-{threading.get_ident()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        _fsync_dir(path.parent)


# -- reading ---------------------------------------------------------------------------
def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest, checked for form but not against the files; raises CheckpointError."""
    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path}: no {MANIFEST_FILE}, so it is incomplete or not a "
                              f"checkpoint of this trainer{_pickle_hint(path)}")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files, info = manifest[KEY_FILES], CheckpointInfo(**manifest[KEY_CHECKPOINT])
        version = manifest[KEY_FORMAT]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path}: unreadable {MANIFEST_FILE} ({exc!r})") from exc
    if version > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path}: format version {version} is newer than this trainer's "
                              f"({FORMAT_VERSION}); upgrade smallgpt-lab to load it")
    bad = [n for n in files if Path(n).name != n or n.startswith(".")]
    missing = [n for n in REQUIRED_FILES if n not in files]
    if bad or missing:
        raise CheckpointError(f"checkpoint {path}: the manifest lists unsafe names {bad} or lacks {missing}")
    return {**manifest, KEY_CHECKPOINT: info}


def read_info(path: Path) -> CheckpointInfo:
    return read_manifest(path)[KEY_CHECKPOINT]


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Check every file against the manifest; return the manifest or raise CheckpointError."""
    path = Path(path)
    manifest = read_manifest(path)
    for name, expected in manifest[KEY_FILES].items():
        actual = path / name
        if not actual.is_file():
            raise CheckpointError(f"checkpoint {path}: {name} is missing")
        if actual.stat().st_size != expected[KEY_BYTES]:
            raise CheckpointError(f"checkpoint {path}: {name} is truncated ({actual.stat().st_size} of "
                                  f"{expected[KEY_BYTES]} bytes)")
        if sha256_file(actual) != expected[KEY_SHA256]:
            raise CheckpointError(f"checkpoint {path}: {name} does not match its sha256 (corrupt)")
    return manifest


def read_checkpoint(path: Path) -> Snapshot:
    """Verify and read a checkpoint: tensors through safetensors, the rest as JSON."""
    path = Path(path)
    manifest = verify_checkpoint(path)
    tensors = {name: load_tensors(path / name) for name in manifest[KEY_FILES] if name.endswith(".safetensors")}
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE} is not valid JSON ({exc})") from exc
    return Snapshot(tensors, state, manifest[KEY_CHECKPOINT])


def load_tensors(file: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; a pickle is refused unread, since unpickling can run code."""
    with open(file, "rb") as f:
        head = f.read(4)
    if head.startswith(_PICKLE_MAGIC):
        raise CheckpointError(f"{file} is a pickle (torch.save) file, not safetensors: it is never loaded, "
                              "because unpickling a file can run arbitrary code; convert it with "
                              "safetensors.torch.save_file in an environment you trust")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{file} is not a readable safetensors file ({exc})") from exc


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# -- files -----------------------------------------------------------------------------
def _pickle_hint(path: Path) -> str:
    pickles = sorted(p.name for p in path.glob("*") if p.suffix in (".pt", ".pth", ".bin", ".pkl", ".ckpt"))
    if not pickles:
        return ""
    return (f"; {', '.join(pickles)} are pickle files, which are never loaded because unpickling can run "
            "arbitrary code")


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())


def _describe(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    return {KEY_BYTES: path.stat().st_size, KEY_SHA256: sha256_file(path)}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename tmp to final; an older directory of that name is moved aside first, then removed."""
    old = final.with_name(f"{OLD_PREFIX}{final.name}-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)

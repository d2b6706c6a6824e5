"""The checkpoint format: a directory of safetensors and JSON files with a manifest.

A checkpoint exists only when its manifest is complete: the files are written into a
temporary directory and fsynced, the manifest (every file's size and sha256) is written
last, and the directory is renamed into place. Nothing here unpickles: tensors are
safetensors, everything else is JSON, and a file that looks like a pickle is refused
before anything reads it.

The three records of this package are defined here: ``CheckpointInfo`` (what a checkpoint
is and where), ``Snapshot`` (its content in host memory) and ``SaveResult`` (how a write went).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from trainer.errors import CheckpointError
from trainer.files import TMP_PREFIX, as_os_error, atomic_write_json, fsync_dir

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
KEY_CHECKPOINT = "checkpoint"      # a CheckpointInfo's manifest fields
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

# Names of directories in a checkpoints folder (temporary ones start with trainer.files.TMP_PREFIX).
STEP_PREFIX = "step-"
OLD_PREFIX = ".old-"               # replaced, being removed
KINDS = ("periodic", "best", "emergency", "final")

# The first bytes of files that must never reach a loader: pickle protocols 2-5 and
# torch.save's zip archive (a pickle inside).
_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")

# The CheckpointInfo fields a manifest holds (the other three describe the copy on disk).
MANIFEST_FIELDS = ("step", "epoch", "kind", "val_loss", "run_id", "weights_only", "written_at")


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint is. The first seven fields are kept in its manifest, so that listing
    needs no hashing; the last three say where it is and are known once it is on disk."""

    step: int
    epoch: int
    kind: str
    val_loss: float | None      # measured at this very step, else None
    run_id: int | None
    weights_only: bool          # no optimizer state: a resume restarts AdamW
    written_at: float = 0.0     # unix time the manifest was written: orders checkpoints
    path: Path | None = None
    size_bytes: int = 0         # every file, the manifest included
    sha256: str = ""            # of the manifest, which holds every file's sha256

    def manifest_fields(self) -> dict[str, Any]:
        """The fields written into manifest.json (and the portable JSON's "info")."""
        return {name: getattr(self, name) for name in MANIFEST_FIELDS}

    @classmethod
    def from_manifest(cls, fields: dict[str, Any], **where: Any) -> "CheckpointInfo":
        """Read manifest fields; an unknown one is a TypeError, as for any malformed manifest."""
        unknown = set(fields) - set(MANIFEST_FIELDS)
        if unknown:
            raise TypeError(f"unexpected fields {sorted(unknown)}")
        return cls(**fields, **where)



@dataclass
class Snapshot:
    """A checkpoint's content in host memory, ready to be written by any thread."""

    tensors: dict[str, dict[str, torch.Tensor]]   # file name -> tensor name -> tensor
    state: dict[str, Any]                         # trainer_state.json
    info: CheckpointInfo


@dataclass(frozen=True)
class SaveResult:
    """One write: the checkpoint (``info.path`` always set), how long it took, and either the
    temporary directory it waits in until published or the error it failed with."""

    info: CheckpointInfo
    seconds: float = 0.0
    tmp: Path | None = None                # written, not yet renamed into place
    error: BaseException | None = None     # the write failed; nothing was published

    @property
    def path(self) -> Path:
        return self.info.path


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:07d}"


# -- writing ---------------------------------------------------------------------------
def write_checkpoint(path: Path, snapshot: Snapshot) -> CheckpointInfo:
    """Write ``snapshot`` as the checkpoint directory ``path``, atomically; replaces one there."""
    return publish(prepare_checkpoint(path, snapshot)).info


def prepare_checkpoint(path: Path, snapshot: Snapshot) -> SaveResult:
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
        atomic_write_json(tmp / STATE_FILE, snapshot.state, durable=True)
        files = {name: _describe(tmp / name) for name in sorted(os.listdir(tmp))}
        # A fresh capture has no time yet; an imported checkpoint keeps the one it was written at.
        info = snapshot.info if snapshot.info.written_at else replace(snapshot.info, written_at=time.time())
        atomic_write_json(tmp / MANIFEST_FILE, {KEY_FORMAT: FORMAT_VERSION, KEY_CHECKPOINT: info.manifest_fields(),
                                                KEY_FILES: files}, durable=True)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        disk = as_os_error(exc)
        if disk is not None and disk is not exc:    # safetensors' own error for a full disk
            raise disk from exc
        raise
    size = sum(f[KEY_BYTES] for f in files.values()) + (tmp / MANIFEST_FILE).stat().st_size
    info = replace(info, path=path, size_bytes=size, sha256=sha256_file(tmp / MANIFEST_FILE))
    return SaveResult(info, time.perf_counter() - start, tmp=tmp)


def publish(prepared: SaveResult) -> SaveResult:
    """Rename a prepared checkpoint into place: from this moment on it exists."""
    _replace_dir(prepared.tmp, prepared.path)
    return replace(prepared, tmp=None)


# -- reading ---------------------------------------------------------------------------
def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest, checked for form but not against the files; raises CheckpointError.

    Its ``KEY_CHECKPOINT`` entry is a complete CheckpointInfo (path, size and the manifest's sha256).
    """
    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path}: no {MANIFEST_FILE}, so it is incomplete or not a "
                              f"checkpoint of this trainer{_pickle_hint(path)}")
    try:
        raw = manifest_path.read_bytes()
        manifest = json.loads(raw)
        files, version = manifest[KEY_FILES], manifest[KEY_FORMAT]
        size = sum(f[KEY_BYTES] for f in files.values()) + len(raw)
        info = CheckpointInfo.from_manifest(manifest[KEY_CHECKPOINT], path=path, size_bytes=size,
                                            sha256=hashlib.sha256(raw).hexdigest())
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
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


def _describe(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        os.fsync(f.fileno())      # safetensors does not fsync what it writes
    return {KEY_BYTES: path.stat().st_size, KEY_SHA256: sha256_file(path)}


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename tmp to final; an older directory of that name is moved aside first, then removed."""
    old = final.with_name(f"{OLD_PREFIX}{final.name}-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


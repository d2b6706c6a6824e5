"""A checkpoint as one JSON file, and back, bit for bit.

For places that take text, such as a dataset uploaded to Kaggle. Each tensor is stored as
its raw little-endian bytes in base64, with its dtype and shape: a third larger than the
binary, against 5-6 times (and seconds per megabyte) for lists of decimal floats. JSON
files of the checkpoint are embedded as JSON. Import writes the checkpoint directory
through the same atomic writer as training, so the files come back byte-identical.

    {"format": "smallgpt-lab-checkpoint", "format_version": 1,
     "info": {step, epoch, kind, val_loss, run_id, weights_only, written_at},
     "files": {"trainer_state.json": {"json": {...}},
               "model.safetensors": {"metadata": {...}, "tensors": {
                   "transformer.wte.weight": {"dtype": "F32", "shape": [512, 32], "data": "<base64>"}}}}}

(a GPT-2's token embedding; a Llama's is "model.embed_tokens.weight": the format knows no architecture.)
"""
from __future__ import annotations

import base64
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import safe_open

from trainer.checkpoints.format import (MODEL_FILE, OPTIMIZER_FILE, RNG_FILE, STATE_FILE, CheckpointInfo, Snapshot,
                                        read_checkpoint, write_checkpoint)
from trainer.errors import CheckpointError
from trainer.files import TMP_PREFIX, fsync_dir

FORMAT = "smallgpt-lab-checkpoint"
FORMAT_VERSION = 1
# Keys of the JSON file.
KEY_FORMAT, KEY_VERSION, KEY_INFO, KEY_FILES = "format", "format_version", "info", "files"
KEY_JSON, KEY_METADATA, KEY_TENSORS = "json", "metadata", "tensors"
KEY_DTYPE, KEY_SHAPE, KEY_DATA = "dtype", "shape", "data"

# safetensors' dtype names, which the JSON uses too.
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
          "U8": torch.uint8, "BOOL": torch.bool}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def export_json(checkpoint: Path, out: Path, weights_only: bool = False) -> Path:
    """Write the verified checkpoint directory ``checkpoint`` as the JSON file ``out``."""
    checkpoint, out = Path(checkpoint), Path(out)
    snapshot = read_checkpoint(checkpoint)      # verifies every file against the manifest
    if weights_only:
        snapshot.tensors.pop(OPTIMIZER_FILE, None)
    info = replace(snapshot.info, weights_only=snapshot.info.weights_only or weights_only)
    # Streamed rather than through trainer.files.atomic_write_bytes, which would hold the whole
    # file (a third larger than the weights) in memory; the same temporary name, fsync, replace.
    tmp = out.with_name(f"{TMP_PREFIX}{out.name}-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(b'{"%s": "%s", "%s": %d, ' % (KEY_FORMAT.encode(), FORMAT.encode(), KEY_VERSION.encode(),
                                                    FORMAT_VERSION))
            f.write(f'"{KEY_INFO}": {json.dumps(info.manifest_fields())}, "{KEY_FILES}": {{'.encode())
            f.write(f'"{STATE_FILE}": {json.dumps({KEY_JSON: snapshot.state}, allow_nan=False)}'.encode())
            for name, tensors in snapshot.tensors.items():
                f.write(f', "{name}": '.encode())
                _write_tensor_file(f, tensors, _metadata(checkpoint / name))
            f.write(b"}}")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(out.parent)
    return out


def import_json(source: Path, out: Path) -> Path:
    """Rebuild the checkpoint directory ``out`` from a JSON file written by export_json."""
    source = Path(source)
    try:
        with open(source, "rb") as f:
            doc = json.load(f)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{source} is not a readable JSON file ({exc}); pass a file written by "
                              "python -m trainer.export json") from exc
    if not isinstance(doc, dict) or doc.get(KEY_FORMAT) != FORMAT:
        raise CheckpointError(f"{source} is not a {FORMAT} JSON file; pass a file written by "
                              "python -m trainer.export json")
    if doc.get(KEY_VERSION, 0) > FORMAT_VERSION:
        raise CheckpointError(f"{source} has format version {doc[KEY_VERSION]}, newer than this trainer's "
                              f"({FORMAT_VERSION}); upgrade smallgpt-lab")
    try:
        files, info = doc[KEY_FILES], CheckpointInfo.from_manifest(doc[KEY_INFO])
        state = files.pop(STATE_FILE)[KEY_JSON]
        unknown = set(files) - {MODEL_FILE, OPTIMIZER_FILE, RNG_FILE}
        if unknown:    # names become file names: only the known ones, never a path
            raise ValueError(f"unexpected files {sorted(unknown)}")
        tensors = {name: {k: _decode(v) for k, v in entry[KEY_TENSORS].items()} for name, entry in files.items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: malformed {FORMAT} file ({exc!r})") from exc
    write_checkpoint(Path(out), Snapshot(tensors, state, info))
    return Path(out)


def _write_tensor_file(f: BinaryIO, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    f.write(f'{{"{KEY_METADATA}": {json.dumps(metadata)}, "{KEY_TENSORS}": {{'.encode())
    for i, (name, t) in enumerate(tensors.items()):
        head = {KEY_DTYPE: DTYPE_NAMES[t.dtype], KEY_SHAPE: list(t.shape)}
        f.write(f'{", " if i else ""}{json.dumps(name)}: {json.dumps(head)[:-1]}, "{KEY_DATA}": "'.encode())
        f.write(base64.b64encode(_raw_bytes(t)))
        f.write(b'"}')
    f.write(b"}}")


def _raw_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's bytes in memory order (little-endian on every platform torch runs on)."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def _decode(entry: dict[str, Any]) -> torch.Tensor:
    dtype, shape = DTYPES[entry[KEY_DTYPE]], entry[KEY_SHAPE]
    raw = bytearray(base64.b64decode(entry[KEY_DATA], validate=True))
    if not raw:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(raw, dtype=dtype).reshape(shape)


def _metadata(file: Path) -> dict[str, str]:
    with safe_open(str(file), framework="pt") as f:
        return f.metadata() or {}

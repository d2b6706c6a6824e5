"""Read what an offline W&B run wrote: its ``.wandb`` transaction log, without uploading.

W&B 0.31 keeps an offline run only in ``<dir>/wandb/offline-run-<time>-<id>[-N]/run-<id>.wandb``
(no config.yaml or summary file until it is synced), and ships no Python reader for it.
The framing is the LevelDB log format wandb-core writes (a 7-byte file header, 32 KiB
blocks, records of crc32 / length / type split across blocks); each record's payload is
parsed with wandb's own protobuf ``Record``. Used for two things: the W&B mirror finds the
last step earlier offline fragments of the same run hold (so a resume does not draw a step
twice), and tests and users can check what a later ``wandb sync`` will upload.
"""
from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

_FILE_HEADER = 7                    # b":W&B", magic 0xBEE1, version byte
_BLOCK = 32768
_RECORD_HEADER = 7                  # crc32 (of type byte + data), length (u16), type (u8)
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


@dataclass
class OfflineRun:
    """One offline fragment of a run: what ``wandb sync`` would upload from it."""

    path: Path
    run_id: str | None = None
    project: str | None = None
    name: str | None = None
    group: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)    # one dict per logged row, "_step" included
    summary: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None

    @property
    def steps(self) -> list[int]:
        return [int(row["_step"]) for row in self.history if "_step" in row]


def payloads(path: str | Path) -> Iterator[bytes]:
    """The records' bytes, in order. A torn tail (a killed writer) ends the iteration quietly."""
    data = Path(path).read_bytes()
    pos, pending = _FILE_HEADER, b""
    while pos + _RECORD_HEADER <= len(data):
        if _BLOCK - pos % _BLOCK < _RECORD_HEADER:      # a block's tail too short for a header is padding
            pos += _BLOCK - pos % _BLOCK
            continue
        crc, length, kind = struct.unpack_from("<IHB", data, pos)
        chunk = data[pos + _RECORD_HEADER:pos + _RECORD_HEADER + length]
        if kind == 0 or len(chunk) < length or zlib.crc32(bytes([kind]) + chunk) != crc:
            return
        pos += _RECORD_HEADER + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
            pending = b""


def read_offline_run(path: str | Path) -> OfflineRun:
    """Parse one ``run-<id>.wandb`` file (or the run folder holding it)."""
    from wandb.proto import wandb_internal_pb2 as pb

    path = _log_file(Path(path))
    run = OfflineRun(path=path)
    for payload in payloads(path):
        record = pb.Record()
        record.ParseFromString(payload)
        _apply(run, record)
    return run


def offline_fragments(wandb_parent: str | Path, run_id: str) -> list[Path]:
    """The ``.wandb`` files of ``run_id`` under ``<wandb_parent>/wandb/``, oldest first (as sync orders them)."""
    root = Path(wandb_parent) / "wandb"
    found = root.glob(f"*run-*-{run_id}*/run-{run_id}.wandb")
    return sorted(found, key=lambda p: _started(p.parent.name, run_id))


def last_step(files: list[Path]) -> int:
    """The highest ``_step`` any of ``files`` holds; -1 when none holds a row."""
    return max((max(read_offline_run(f).steps, default=-1) for f in files), default=-1)


def _started(folder: str, run_id: str) -> tuple[str, int]:
    """Sort key of ``[offline-]run-<YYYYmmdd_HHMMSS>-<id>[-N]``: the time, then wandb's -N suffix
    for a second fragment started within the same second."""
    stamp = folder.split("-run-", 1)[-1].split("-", 1)[0] if "-run-" in folder else folder.split("-")[1]
    suffix = folder.rsplit(run_id, 1)[-1].lstrip("-")
    return stamp, int(suffix) if suffix.isdigit() else 0


def _log_file(path: Path) -> Path:
    if path.is_dir():
        files = sorted(path.glob("run-*.wandb"))
        if not files:
            raise FileNotFoundError(f"no run-*.wandb file in {path}")
        return files[0]
    return path


def _apply(run: OfflineRun, record: Any) -> None:
    kind = record.WhichOneof("record_type")
    if kind == "run":
        r = record.run
        run.run_id, run.project, run.name, run.group = r.run_id, r.project, r.display_name, r.run_group
        run.config.update(_items(r.config.update))
    elif kind == "config":
        run.config.update(_items(record.config.update))
    elif kind == "history":
        row = _items(record.history.item)
        if "_step" not in row and record.history.HasField("step"):
            row["_step"] = record.history.step.num
        run.history.append(row)
    elif kind == "summary":
        run.summary.update(_items(record.summary.update))
    elif kind == "exit":
        run.exit_code = record.exit.exit_code


def _items(items: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key = "/".join(item.nested_key) if item.nested_key else item.key
        out[key] = json.loads(item.value_json) if item.value_json else None
    # W&B stores each config value as {"value": ..., "desc": ...}
    return {k: v["value"] if isinstance(v, dict) and set(v) <= {"value", "desc"} and "value" in v else v
            for k, v in out.items()}

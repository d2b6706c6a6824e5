"""A run folder's own record of its run, ``run.json`` in --out: the row (uid and id), its
status and the process training it. The next start in the folder reads it: a run that a
process which is gone left ``running`` before its first checkpoint is continued in the same
row (trainer.run), not recorded twice."""
from __future__ import annotations

import json
import os
import socket
import uuid
from pathlib import Path
from typing import Callable

from trainer.files import atomic_write_json, pid_alive

RUN_FILE = "run.json"      # in --out: the folder's run (uid, row id, status, process), for the next start


def run_identity(out_dir: Path, resumed_uid: str | None, resuming: bool) -> tuple[str | None, bool]:
    """The uid naming this run's row in any database, and whether it takes over the row of a run
    that a process which is gone left ``running`` here before its first checkpoint. A resume
    keeps its checkpoint's uid (None from checkpoints older than uids: their row id names it)."""
    if resuming:
        return resumed_uid, False
    left = read_run_file(out_dir)
    if left.get("status") == "running" and isinstance(left.get("uid"), str) and not alive(left):
        return left["uid"], True
    return uuid.uuid4().hex, False


def read_run_file(out_dir: Path) -> dict:
    try:
        record = json.loads((out_dir / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def alive(record: dict) -> bool:
    """Whether the process that wrote ``record`` still runs (on this machine; elsewhere it is gone)."""
    pid = record.get("pid")
    if record.get("host") != socket.gethostname() or not isinstance(pid, int):
        return False
    return pid == os.getpid() or pid_alive(pid)


def write_run_file(out_dir: Path, uid: str | None, run_id: int | None, status: str,
                   log: Callable[[str], None]) -> None:
    """This folder's run: its row (uid and id), its status and the process training it (no uid: none)."""
    if uid is None:
        return
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out_dir / RUN_FILE, {"uid": uid, "run_id": run_id, "status": status,
                                               "pid": os.getpid(), "host": socket.gethostname()})
    except OSError as exc:      # a hint for the next start: a full disk must not stop the run
        log(f"warning: {out_dir / RUN_FILE} not written ({exc})")

"""Session packs: everything the next Kaggle or Colab session needs, in one folder and one .tar.

    python -m trainer.pack --out runs/run [--db experiments.db]
    python -m studies.pack --study S          (a study's pack: studies.pack)

A pack is ``session-pack/`` in the working folder plus ``session-pack.tar`` of it
(Kaggle's dataset upload skips subfolders unless told otherwise, so the .tar is what to
upload). Inside: ``experiments.db`` (a consistent snapshot, SQLite's backup API, with its
paths rewritten to the pack's own), checkpoints, final models, dashboards, and
``pack.json``: every file with its size and sha256, what the pack holds, and the exact
command for the next session. A pack is built in a temporary folder and swapped in
whole by two renames, so a kill while packing leaves the previous pack or the new one,
complete, and the next pack finishes the swap (``recover_pack``).

This module is the format (build, read, verify, find) and the single-run pack; the
database's part (checks, the --continue-from merge, the snapshot's paths) goes through
``trainer.recorder.Database``, as the command line's does: the trainer imports no database code.
The studies' side of sessions (a study's pack, the hand-off between sessions, the notebook's
helpers) is studies.pack, studies.sessions and studies.notebook.
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import shutil
import sqlite3
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.errors import ConfigError
from trainer.files import TMP_PREFIX, atomic_write_json, json_safe, pause_point
from trainer.recorder import find_database

PACK_DIR = "session-pack"
PACK_TAR = "session-pack.tar"
PACK_JSON = "pack.json"
PACK_DB = "experiments.db"
PACK_FORMAT = 1
SEARCH_DEPTH = 4     # how deep an input folder is searched for packs


@dataclass(frozen=True)
class PackResult:
    folder: Path
    tar: Path
    bytes: int          # the folder's files (the .tar is the same again)
    files: int


def pack_paths(workdir: Path) -> tuple[Path, Path]:
    return workdir / PACK_DIR, workdir / PACK_TAR


def _staging_paths(workdir: Path) -> tuple[Path, Path]:
    """The pack being built, and the previous pack while the new one is swapped in."""
    return workdir / f"{TMP_PREFIX}{PACK_DIR}", workdir / f"{TMP_PREFIX}{PACK_DIR}.old"


def start_pack(workdir: Path) -> Path:
    """An empty staging folder beside the pack; ``finish_pack`` swaps it in."""
    recover_pack(workdir)
    staging, _ = _staging_paths(workdir)
    if staging.exists():
        shutil.rmtree(staging)      # a pack interrupted before it was complete
    staging.mkdir(parents=True)
    return staging


def recover_pack(workdir: Path) -> None:
    """Finish the swap of a pack whose process was killed mid-way: the new pack when it was
    complete (its pack.json is written last), else the previous one, is put back in place."""
    folder, _ = pack_paths(workdir)
    staging, old = _staging_paths(workdir)
    if not folder.exists():
        if (staging / PACK_JSON).is_file():
            os.replace(staging, folder)
        elif old.is_dir():
            os.replace(old, folder)
    if old.exists():
        shutil.rmtree(old)


def copy_into(staging: Path, source: Path, relative: str) -> Path:
    """Copy a file or folder into the pack at ``relative``."""
    target = staging / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        shutil.copytree(source, target, ignore=shutil.ignore_patterns(f"{TMP_PREFIX}*"))
    else:
        shutil.copy2(source, target)
    return target


def snapshot_database(source: Path, target: Path) -> None:
    """A consistent copy of a SQLite database, even one being written (WAL included)."""
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    dst = sqlite3.connect(target)
    try:
        src.backup(dst)
        dst.execute("PRAGMA journal_mode=DELETE")    # one self-contained file: no -wal beside it
    finally:
        dst.close()
        src.close()


def finish_pack(staging: Path, workdir: Path, meta: dict[str, Any]) -> PackResult:
    """Write pack.json (every file, size and sha256, plus ``meta``), swap the pack in, tar it."""
    files = {p.relative_to(staging).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_of(p)}
             for p in sorted(staging.rglob("*")) if p.is_file()}
    atomic_write_json(staging / PACK_JSON, json_safe({
        "format": PACK_FORMAT, "created_at": dt.datetime.now(dt.timezone.utc).isoformat(), **meta,
        "files": files}), indent=1)
    pause_point("pack.staged")
    folder, tar = pack_paths(workdir)
    _, old = _staging_paths(workdir)
    # Two renames, never a folder half deleted: a kill between them leaves both packs whole,
    # and the next pack (recover_pack) or reader (find_packs) takes the new one.
    if folder.exists():
        os.replace(folder, old)
    pause_point("pack.swapping")
    os.replace(staging, folder)
    if old.exists():
        shutil.rmtree(old)
    partial = tar.with_name(f"{TMP_PREFIX}{tar.name}")
    with tarfile.open(partial, "w") as archive:     # uncompressed: checkpoints do not shrink
        archive.add(folder, arcname=PACK_DIR)
    pause_point("pack.tar")
    os.replace(partial, tar)
    return PackResult(folder, tar, sum(f["bytes"] for f in files.values()), len(files))


def read_pack(folder: Path) -> dict[str, Any] | None:
    """A pack's pack.json, or None when ``folder`` is no pack."""
    path = folder / PACK_JSON
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"files": {}, "unreadable": True}


def pack_problems(folder: Path, meta: dict[str, Any]) -> list[str]:
    """Files of the pack that are missing or do not match their size or sha256 (reads all of them)."""
    if meta.get("unreadable"):
        return [f"its {PACK_JSON} cannot be read"]
    problems = []
    for name, want in meta.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != want["bytes"] or sha256_of(path) != want["sha256"]:
            problems.append(f"{name} does not match its sha256 in {PACK_JSON}")
    return problems


def find_packs(top: Path) -> list[Path]:
    """Pack folders under ``top`` (itself included), oldest first by their pack.json."""
    found = []
    for root, dirs, files in os.walk(top):
        depth = len(Path(root).relative_to(top).parts)
        # A complete pack that a kill left in its staging folder (recover_pack) counts as the pack.
        unswapped = f"{TMP_PREFIX}{PACK_DIR}" if PACK_DIR not in dirs else None
        dirs[:] = sorted(d for d in dirs if (not d.startswith(".") or d == unswapped) and depth < SEARCH_DEPTH)
        if PACK_JSON in files:
            found.append(Path(root))
            dirs[:] = []
    return sorted(found, key=lambda p: (read_pack(p) or {}).get("created_at", ""))


def sha256_of(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def describe(result: PackResult) -> str:
    return (f"session pack: {result.folder} ({result.bytes / 1e6:.1f} MB, {result.files} files) and "
            f"{result.tar}; save it with the notebook's output (Save Version), or upload the .tar as a "
            "dataset, and pass it to the next session with --continue-from")


# -- inputs: a previous session's pack or output folder, read in place ------------------------
def input_problems(folder: Path, flag: str, study_name: str | None = None) -> list[str]:
    """What is wrong with continuing from ``folder`` (reads only): one line each, naming the flag,
    the folder and the fix. A pack's files are all hashed against its pack.json."""
    label = f"{flag} {str(folder)!r}"
    if not folder.is_dir():
        staging = _staging_paths(folder.parent)[0]
        if folder.name == PACK_DIR and (staging / PACK_JSON).is_file():
            return [f"{label}: no such folder: its pack was being swapped in when the process was killed; "
                    f"pass {staging} (the complete new pack), or write the pack again"]
        return [f"{label}: no such folder; pass the previous session's {PACK_DIR}/ (or the folder it ran in)"]
    meta = read_pack(folder)
    if meta is not None and (bad := pack_problems(folder, meta)):
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        return [f"{label}: {bad[0]}{more}: the pack was changed or damaged after it was written; copy it "
                f"again from the previous session (its {PACK_TAR}) and pass that"]
    name = ((meta or {}).get("study") or {}).get("name")
    if study_name and name and name != study_name:
        return [f"{label}: a pack of study {name!r}, not {study_name!r}; pass --study-name {name} to "
                "continue it, or a pack of this study"]
    if (folder / PACK_DB).is_file():
        if bad := find_database().problems(folder / PACK_DB, create=False, write=False):
            return [f"{label}: {bad[0]}"]
    elif not _has_checkpoints(folder):
        return [f"{label}: no {PACK_DB} and no checkpoints in it; pass the previous session's "
                f"{PACK_DIR}/ or the folder it ran in"]
    return []


def _has_checkpoints(folder: Path) -> bool:
    from trainer.checkpoints import MANIFEST_FILE

    return any(p.name == MANIFEST_FILE for p in _walk(folder, SEARCH_DEPTH + 2))


def _walk(top: Path, depth: int):
    for root, dirs, files in os.walk(top):
        if len(Path(root).relative_to(top).parts) >= depth:
            dirs[:] = []
        yield from (Path(root) / f for f in files)


def input_database(folder: Path) -> Path | None:
    db = folder / PACK_DB
    return db if db.is_file() else None


def continued_config(cfg, folders: list[str]):
    """The run continued from earlier sessions' folders: --resume auto, searching them too."""
    return cfg.replace(resume="auto", resume_from=[*cfg.resume_from, *[str(Path(f).absolute()) for f in folders]])


def merge_inputs(folders: list[str], into: str, log=print) -> None:
    """Merge each input's database into the working one (idempotent)."""
    sources = [db for f in folders if (db := input_database(Path(f))) is not None]
    for summary in find_database().merge(sources, into=into):     # no sources: nothing, no file
        log(f"--continue-from: merged {summary}")


# -- the pack of one run (python -m trainer.pack) --------------------------------------------
def pack_run(out_dir: Path, db_path: Path | None, workdir: Path, command: str) -> PackResult:
    """A run's pack: its newest valid checkpoint, its final model, and the database. Raises
    ConfigError, before anything is written, when the database cannot be reached (not installed)."""
    from trainer.checkpoints import scan, verify_checkpoint
    from trainer.errors import CheckpointError

    database = find_database() if db_path is not None and db_path.is_file() else None
    staging = start_pack(workdir)
    held: dict[str, str] = {}
    for info in scan(out_dir / "checkpoints"):
        try:
            verify_checkpoint(info.path)
        except CheckpointError:
            continue
        copy_into(staging, info.path, f"run/checkpoints/{info.path.name}")
        held[str(info.path.resolve())] = f"run/checkpoints/{info.path.name}"
        break
    if (out_dir / "final_model").is_dir():
        copy_into(staging, out_dir / "final_model", "run/final_model")
    if database is not None:
        snapshot_database(db_path, staging / PACK_DB)
        database.point_at_pack(staging / PACK_DB, out_dir, held)
    return finish_pack(staging, workdir, {"kind": "run", "run": {"out_dir": str(out_dir)},
                                          "checkpoints": sorted(held.values()), "next_command": command})


def build_parser() -> argparse.ArgumentParser:
    from trainer.cli import Parser

    p = Parser(prog="python -m trainer.pack", description="Write the session pack of one training run.")
    p.add_argument("--out", default="runs/run", metavar="DIR", help="The run's folder (default: runs/run).")
    p.add_argument("--db", default="experiments.db", metavar="FILE",
                   help="Its SQLite experiment database (default: experiments.db; skipped when absent).")
    p.add_argument("--workdir", default=".", metavar="DIR",
                   help="Where session-pack/ and session-pack.tar go (default: here).")
    return p


def main(argv: list[str] | None = None) -> int:
    from trainer.cli import fail

    args = build_parser().parse_args(argv)
    out = Path(args.out)
    if not (out / "checkpoints").is_dir() and not (out / "final_model").is_dir():
        print(f"python -m trainer.pack: --out {args.out!r}: no checkpoints/ or final_model/ in it; pass the "
              "folder of a training run (python -m trainer --out DIR)", file=sys.stderr)
        return 2
    command = f"python -m trainer --out {args.out} --resume auto --continue-from {Path(args.workdir) / PACK_DIR}"
    try:
        result = pack_run(out, Path(args.db), Path(args.workdir), command)
    except ConfigError as exc:
        fail("python -m trainer.pack", exc)
    print(describe(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

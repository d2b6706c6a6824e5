"""A study over several sessions: --continue-from, Kaggle's defaults, and the pack at the end.

A session continues from earlier ones' packs or output folders, read in place:

1. each input's ``experiments.db`` is merged into the working database (idempotent: a run
   or trial already there is recognised and left alone, or replaced by a newer copy);
2. trials that were running there are released: the first worker here takes each over,
   and its trial resumes from the newest valid checkpoint in the input's folder for it
   (the run's recorded folder, found through the merged database) or in its own folder here;
3. everything new goes to the working folder: the input is never written.

On Kaggle (``KAGGLE_KERNEL_RUN_TYPE`` set, or /kaggle/input present) with no
--continue-from, the packs under /kaggle/input are used, and the session says so; the
study-wide disk budget defaults to 18 GB of the 20 GB that /kaggle/working keeps.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from studies.environment import KAGGLE_INPUT, platform
from trainer.pack import PACK_DIR, find_packs, input_database, input_problems, read_pack

FLAG = "--continue-from"
KAGGLE_MAX_DISK_GB = 18.0


def session_defaults(args: argparse.Namespace, log=print) -> argparse.Namespace:
    """The flags with Kaggle's defaults filled in: --continue-from from /kaggle/input, --max-disk-gb 18."""
    if platform() != "kaggle":
        return args
    changes = {}
    if args.max_disk_gb is None:
        changes["max_disk_gb"] = KAGGLE_MAX_DISK_GB
    if not args.continue_from:
        packs = find_packs(KAGGLE_INPUT) if KAGGLE_INPUT.is_dir() else []
        changes["continue_from"] = [str(p) for p in packs]
        log(_kaggle_found(packs))
    return argparse.Namespace(**{**vars(args), **changes})


def _kaggle_found(packs: list[Path]) -> str:
    if not packs:
        return (f"on Kaggle: no session pack under {KAGGLE_INPUT}; starting the study afresh (to continue "
                f"one, add the previous version's output, or a dataset of its {PACK_DIR}.tar, as an input)")
    described = "; ".join(f"{p} ({_summary(read_pack(p) or {})})" for p in packs)
    return (f"on Kaggle: continuing from {len(packs)} session pack(s) under {KAGGLE_INPUT}: {described}. "
            "Their databases are merged into this one and their unfinished trials resume from their "
            "checkpoints, read in place; pass --continue-from to choose others")


def _summary(meta: dict) -> str:
    study = meta.get("study") or {}
    return (f"study {study.get('name')!r}, {study.get('complete', 0) + study.get('pruned', 0) + study.get('fail', 0)}"
            f" of {study.get('trials_asked')} trials finished, unfinished: {study.get('unfinished') or 'none'}, "
            f"written {meta.get('created_at', '?')[:16]}")


def continue_problems(folders: list[str], study_name: str, working_db: str) -> list[str]:
    """Every --continue-from folder checked, reading only (a pack's files hashed)."""
    problems = []
    for folder in folders:
        path = Path(folder)
        if path.resolve() == Path(working_db).resolve().parent:
            problems.append(f"{FLAG} {folder!r}: that is this session's own folder; run without {FLAG} "
                            "to continue there")
            continue
        problems += input_problems(path, FLAG, study_name)
    return problems


def merge_inputs(folders: list[str], working_db: str, study_name: str, log=print) -> list[int]:
    """Merge each input's database into the working one; return the study's trials that came
    in running (to be taken over here)."""
    import expdb

    sources = [db for f in folders if (db := input_database(Path(f))) is not None]
    if not sources:
        return []
    added: list[int] = []
    for report in expdb.merge(sources, into=working_db):
        log(f"{FLAG}: merged {report.summary()}")
        added += [number for name, number in report.added_trials if name == study_name]
    return added

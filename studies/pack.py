"""python -m studies.pack --study S: a study's session pack (also written by itself when a
session ends on its time budget, a signal or the disk budget).

    session-pack/
        experiments.db              the experiment database and the Optuna study (a snapshot)
        trials/trial-0007/checkpoints/step-0000120/   newest valid checkpoint of each unfinished trial
        best/final_model/, best/best_config.yaml      the best completed trial so far
        dashboards/                 the study's PNG and HTML files
        pack.json                   files with sizes and sha256; the study's state; the next command
    session-pack.tar                the same folder as one file

In the snapshot every path names the pack's own copy, relative to the pack, and a
checkpoint the pack does not hold is flagged deleted, so ``python -m expdb --db
session-pack/experiments.db check`` passes wherever the pack is moved.
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

import optuna

from studies.objective import OBJECTIVE_ATTR
from studies.trial import RUN_ID_ATTR
from trainer.pack import (PACK_DB, PackResult, copy_into, describe, finish_pack, pack_paths, read_pack,
                          snapshot_database, start_pack)

PROG = "python -m studies.pack"
RUNNING = (optuna.trial.TrialState.RUNNING,)
__all__ = ["write_study_pack", "pack_paths", "next_command"]


def write_study_pack(db, study: optuna.Study, out_dir: Path, workdir: Path, command: str,
                     n_trials: int | None = None, inputs: list[Path] = ()) -> PackResult:
    """Build the pack of ``study`` (its database ``db``, its trials' folders under ``out_dir``)."""
    staging = start_pack(workdir)
    snapshot_database(Path(db.where), staging / PACK_DB)
    moves: dict[str, str] = {}          # the file now (resolved) -> its place in the pack
    run_dirs: dict[int, str] = {}
    held = _unfinished_checkpoints(db, study, out_dir, staging, moves, run_dirs)
    best = _best_model(db, study, staging, moves, run_dirs)
    for page in sorted([*out_dir.glob("*.png"), *out_dir.glob("*.html")]):
        copy_into(staging, page, f"dashboards/{page.name}")
    _point_at_pack(staging / PACK_DB, db.root, moves, run_dirs)
    meta = {"kind": "study", "study": study_state(study, n_trials, held, best), "next_command": command,
            "continued_from": [_parent(p) for p in inputs], "checkpoints": sorted(held.values())}
    return finish_pack(staging, workdir, meta)


def _unfinished_checkpoints(db, study, out_dir: Path, staging: Path, moves: dict, run_dirs: dict) -> dict[int, str]:
    """Copy the newest valid checkpoint of every running trial; trial number -> its place."""
    held = {}
    for trial in study.get_trials(deepcopy=False, states=RUNNING):
        run_id = trial.user_attrs.get(RUN_ID_ATTR)
        folders = [out_dir / f"trial-{trial.number:04d}", *_recorded_folder(db, run_id)]
        found = newest_valid_checkpoint([f / "checkpoints" for f in folders])
        if found is None:
            continue        # killed before its first checkpoint: it starts over, from its parameters
        place = f"trials/trial-{trial.number:04d}"
        copy_into(staging, found, f"{place}/checkpoints/{found.name}")
        moves[str(found.resolve())] = f"{place}/checkpoints/{found.name}"
        run_dirs[run_id] = place
        held[trial.number] = f"{place}/checkpoints/{found.name}"
    return held


def _best_model(db, study, staging: Path, moves: dict, run_dirs: dict) -> dict[str, Any] | None:
    from studies.report import write_best_config

    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not done:
        return None
    best = min(done, key=lambda t: (t.value, t.number))
    run_id = best.user_attrs.get(RUN_ID_ATTR)
    if run_id is None:
        return None
    write_best_config(db.run(run_id).config, staging / "best" / "best_config.yaml")
    model = next((f / "final_model" for f in _recorded_folder(db, run_id) if (f / "final_model").is_dir()), None)
    if model is not None:
        copy_into(staging, model, "best/final_model")
    run_dirs[run_id] = "best"
    return {"number": best.number, "value": best.value, "params": best.params, "run_id": run_id,
            "final_model": model is not None}


def _recorded_folder(db, run_id: int | None) -> list[Path]:
    if run_id is None:
        return []
    try:
        folder = db.resolve_path(db.run(run_id).out_dir)
    except LookupError:
        return []
    return [folder] if folder is not None else []


def _point_at_pack(snapshot: Path, working_root: Path | None, moves: dict[str, str],
                   run_dirs: dict[int, str]) -> None:
    """The snapshot's paths: the pack's copies, relative to it; checkpoints not in it flagged deleted."""
    import expdb
    from expdb.maintenance import relocate
    from expdb.paths import resolve

    with expdb.open(snapshot) as snap:
        # Paths as the working database stored them: resolved against the working folder.
        located = {int(r.id): moves.get(str(resolve(r.path, working_root).resolve()))
                   for r in snap.checkpoints().itertuples()}
        relocate(snap, located, run_dirs)


def newest_valid_checkpoint(roots: list[Path]) -> Path | None:
    """The newest checkpoint under ``roots`` whose files match its manifest."""
    from trainer.checkpoints import scan, verify_checkpoint
    from trainer.errors import CheckpointError

    found = sorted((c for root in roots for c in scan(root)), key=lambda c: (-c.written_at, -c.step))
    for c in found:
        try:
            verify_checkpoint(c.path)
        except CheckpointError:
            continue
        return c.path
    return None


def study_state(study: optuna.Study, n_trials: int | None, held: dict[int, str], best) -> dict[str, Any]:
    states = [t.state.name.lower() for t in study.get_trials(deepcopy=False)]
    return {"name": study.study_name, "objective": study.user_attrs.get(OBJECTIVE_ATTR), "trials_asked": n_trials,
            "trials": len(states),
            **{s: states.count(s) for s in ("complete", "pruned", "fail", "running")},
            "unfinished": sorted(held), "best": best}


def _parent(folder: Path) -> dict[str, Any]:
    meta = read_pack(folder) or {}
    return {"path": str(folder), "created_at": meta.get("created_at")}


def next_command(argv: list[str], pack_folder: Path) -> str:
    """This session's command for the next one: the same flags, continued from the pack."""
    kept, skip = [], False
    for arg in argv:
        if skip and not arg.startswith("--"):
            continue
        skip = arg == "--continue-from"
        if not skip and not arg.startswith("--continue-from="):
            kept.append(arg)
    return shlex.join(["python", "-m", "studies.search", *kept, "--continue-from", str(pack_folder)])


def build_parser():
    from trainer.cli import Parser

    p = Parser(prog=PROG, description="Write a study's session pack: what the next session continues from.")
    p.add_argument("--study", required=True, metavar="S", help="Study name.")
    p.add_argument("--db", default="experiments.db", metavar="FILE", help="Its SQLite experiment database.")
    p.add_argument("--storage", default=None, metavar="URL", help="Optuna storage (default: the database's file).")
    p.add_argument("--out", default="runs", metavar="DIR", help="Its trials are in DIR/STUDY (default: runs).")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from studies.report import refuse_before_writing

    refuse_before_writing(argparse_for_report(args))
    import expdb
    from studies.context import storage_url_for

    study = optuna.load_study(study_name=args.study, storage=args.storage or storage_url_for(args.db))
    with expdb.open(args.db, create=False) as db:
        workdir = db.root or Path(".")
        folder = pack_paths(workdir)[0]
        command = next_command(["--study-name", args.study, "--db", args.db, "--out", args.out], folder)
        result = write_study_pack(db, study, Path(args.out) / args.study, workdir, command)
    print(describe(result))
    return 0


def argparse_for_report(args):
    """studies.report's checks (database, study) on our flags."""
    import argparse

    return argparse.Namespace(study=args.study, db=args.db, storage=args.storage, top=1,
                              out=str(Path(args.out) / args.study))


if __name__ == "__main__":
    sys.exit(main())

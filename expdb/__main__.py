"""Command line: look after an experiment database without writing Python.

    python -m expdb --db experiments.db runs [--study NAME]
    python -m expdb --db experiments.db studies
    python -m expdb --db experiments.db show RUN
    python -m expdb --db experiments.db export RUN --format csv|json [--table T] [--out FILE]
    python -m expdb --db experiments.db export RUN... --to tensorboard|wandb [--out-dir DIR] [--wandb-project P]
    python -m expdb merge SRC.db... --into DST.db
    python -m expdb --db experiments.db check [--root DIR] [--no-files] [--repair]
    python -m expdb --db experiments.db gc [--root DIR] [--dry-run]

Exit status: 0 done; 1 ``check`` found problems; 2 an error (one line on stderr), after
which nothing was changed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

import expdb
from expdb import maintenance
from expdb.errors import ExpdbError, UnknownRunError
from expdb.values import jsonable

TABLES = ("steps", "evals", "epochs", "checkpoints", "events")
_RUN_COLUMNS = ["id", "name", "status", "study_name", "trial_number", "n_params", "best_val_loss",
                "best_val_bpb", "best_step", "n_steps", "n_epochs", "duration_s", "started_at"]
_EPOCH_COLUMNS = ["epoch", "step", "train_loss", "val_loss", "val_ppl", "val_bpb", "val_word_ppl", "lr",
                  "epoch_seconds", "tokens_per_s", "mfu"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m expdb", description="Look after an experiment database.")
    parser.add_argument("--db", default="experiments.db",
                        help="SQLite file or SQLAlchemy URL (default: experiments.db)")
    sub = parser.add_subparsers(dest="command", required=True)
    runs = sub.add_parser("runs", help="list the runs")
    runs.add_argument("--study", help="only the runs of this study")
    sub.add_parser("studies", help="list the studies: runs by status, best run")
    show = sub.add_parser("show", help="one run's record and its epochs")
    show.add_argument("run", type=int, help="run id")
    export = sub.add_parser("export", help="write a run's history as CSV or JSON, or replay runs into a tracker")
    export.add_argument("run", type=int, nargs="+", help="run id (several with --to)")
    export.add_argument("--format", choices=("csv", "json"))
    export.add_argument("--to", choices=("tensorboard", "wandb"),
                        help="replay the runs into TensorBoard event files or W&B (offline: WANDB_MODE=offline, "
                             "then `wandb sync`)")
    export.add_argument("--out-dir", type=Path, default=None,
                        help="with --to: where the tracker writes (default: each run's own folder)")
    export.add_argument("--wandb-project", default=None, help="with --to wandb: the project (default: the "
                                                              "study name, else the run name)")
    export.add_argument("--table", choices=TABLES,
                        help="which history (csv default: steps; json default: the record and all of them)")
    export.add_argument("--out", type=Path, help="file to write (default: standard output)")
    merge = sub.add_parser("merge", help="copy the runs (and Optuna studies) of other databases into one")
    merge.add_argument("sources", nargs="+", help="databases to merge from (never modified)")
    merge.add_argument("--into", help="database to merge into, created if missing (default: --db)")
    check = sub.add_parser("check", help="integrity, foreign keys, checkpoint files and their sha256")
    check.add_argument("--root", type=Path, default=None,
                       help="directory of relative checkpoint paths (default: the database file's folder)")
    check.add_argument("--no-files", action="store_true", help="skip the checkpoint files")
    check.add_argument("--repair", action="store_true", help="rebuild the step rollups first")
    gc = sub.add_parser("gc", help="remove rotated-away checkpoints: their rows and files")
    gc.add_argument("--root", type=Path, default=None,
                       help="directory of relative checkpoint paths (default: the database file's folder)")
    gc.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        refuse_before_writing(args)
        status, text = COMMANDS[args.command](args)
        if getattr(args, "out", None):
            args.out.write_text(text, encoding="utf-8")
        else:
            sys.stdout.write(text)
    except UnknownRunError as exc:
        runs = args.run if isinstance(args.run, list) else [args.run]
        print(f"expdb: error: RUN {' '.join(map(str, runs))}: {exc}", file=sys.stderr)
        return 2
    except (ExpdbError, OSError) as exc:     # OSError: an unwritable --out, a closed pipe
        for line in str(exc).splitlines():
            print(f"expdb: error: {line}", file=sys.stderr)
        return 2
    return status


def refuse_before_writing(args: argparse.Namespace) -> None:
    """Every database and output path checked, reading only, before a command runs; one
    ExpdbError listing each problem (naming its flag) when any fails."""
    if args.command == "merge":
        checks = [(f"merge source {src!r}: ", src, False) for src in args.sources]
        checks.append((f"--into {args.into or args.db!r}: ", args.into or args.db, True))
    else:
        checks = [(f"--db {args.db!r}: ", args.db, False)]
    problems = []
    for prefix, url, create in checks:
        try:
            expdb.check_database(url, create=create, write=False)   # a read-only --into: merge says why
        except ExpdbError as exc:
            problems.append(prefix + str(exc))
    if out_problem := _out_problem(getattr(args, "out", None)):
        problems.append(out_problem)
    if args.command == "export":
        problems += _export_problems(args)
    if problems:
        raise ExpdbError("\n".join(problems))


def _export_problems(args: argparse.Namespace) -> list[str]:
    if (args.format is None) == (args.to is None):
        return ["export: pass --format csv|json (one run's history as a file) or --to tensorboard|wandb "
                "(replay runs into a tracker), not both and not neither"]
    if args.format and len(args.run) > 1:
        return [f"RUN {' '.join(map(str, args.run))}: --format writes one run; pass one run id, or use --to"]
    if args.to and args.out:
        return [f"--out {str(args.out)!r}: --to writes tracker folders, not a file; use --out-dir DIR"]
    if args.to and args.out_dir is not None and args.out_dir.exists() and not args.out_dir.is_dir():
        return [f"--out-dir {str(args.out_dir)!r}: is a file; pass a directory"]
    return []


def _out_problem(out: Path | None) -> str | None:
    if out is None:
        return None
    if out.is_dir():
        return f"--out {str(out)!r}: is a directory; pass a file name such as {out / 'run.csv'}"
    if not out.parent.is_dir():
        return f"--out {str(out)!r}: directory {out.parent} does not exist; create it first or write elsewhere"
    return None


def _open(args: argparse.Namespace) -> expdb.ExperimentDB:
    """An existing database; read-only by itself where its place is not writable."""
    try:
        return expdb.open(args.db, create=False)
    except ExpdbError as exc:
        raise ExpdbError(f"--db {args.db!r}: {exc}") from exc


def cmd_runs(args: argparse.Namespace) -> tuple[int, str]:
    with _open(args) as db:
        df = db.runs(args.study)
        if df.empty:
            return 0, f"no runs in {db.where}\n"
        return 0, df[_RUN_COLUMNS].to_string(index=False) + "\n"


def cmd_studies(args: argparse.Namespace) -> tuple[int, str]:
    with _open(args) as db:
        df = db.studies()
        return 0, (df.to_string(index=False) + "\n") if len(df) else f"no studies in {db.where}\n"


def cmd_show(args: argparse.Namespace) -> tuple[int, str]:
    with _open(args) as db:
        record = db.run(args.run)
        lines = []
        for name, value in record.as_dict().items():
            if isinstance(value, dict):
                value = json.dumps(value, indent=2, default=str).replace("\n", "\n  ")
            lines.append(f"{name}: {value}")
        epochs = db.epochs(args.run)
    lines.append("")
    lines.append(epochs[_EPOCH_COLUMNS].to_string(index=False) if len(epochs) else "(no epochs recorded)")
    return 0, "\n".join(lines) + "\n"


def cmd_export(args: argparse.Namespace) -> tuple[int, str]:
    if args.to:
        return cmd_replay(args)
    args.run = args.run[0]
    with _open(args) as db:
        if args.format == "csv":
            df = _table(db, args.run, args.table or "steps")
            if "detail" in df:
                df["detail"] = [json.dumps(jsonable(d)) for d in df["detail"]]
            return 0, df.to_csv(index=False)
        tables = [args.table] if args.table else list(TABLES)
        document = {"run": db.run(args.run).as_dict()} if not args.table else {}
        for name in tables:
            document[name] = _table(db, args.run, name).to_dict(orient="records")
    # Strict JSON: non-finite floats are written as the strings "nan", "inf", "-inf".
    return 0, json.dumps(jsonable(document), indent=2, allow_nan=False) + "\n"


def cmd_replay(args: argparse.Namespace) -> tuple[int, str]:
    """Runs already recorded, into TensorBoard or W&B: a Kaggle session without a network, synced later."""
    from expdb.mirrors import MirrorError, replay
    from trainer.errors import ConfigError

    with _open(args) as db:
        for run_id in args.run:
            db.run(run_id)                       # an unknown id fails before any tracker file is written
        try:
            done = replay(db, args.run, args.to, out_dir=args.out_dir, project=args.wandb_project,
                          log=lambda *_: None)
        except (MirrorError, ConfigError) as exc:
            raise ExpdbError(f"--to {args.to}: {exc}") from exc
    return 0, "".join(line + "\n" for line in done)


def _table(db: expdb.ExperimentDB, run_id: int, name: str) -> pd.DataFrame:
    return getattr(db, name)(run_id)


def cmd_merge(args: argparse.Namespace) -> tuple[int, str]:
    reports = expdb.merge(args.sources, into=args.into or args.db)
    return 0, "".join(report.summary() + "\n" for report in reports)


def cmd_check(args: argparse.Namespace) -> tuple[int, str]:
    with _open(args) as db:
        lines = []
        if args.repair:
            lines.append(f"rebuilt the step rollups of {maintenance.repair_rollups(db)} runs")
        report = maintenance.check(db, root=args.root, files=not args.no_files)
        lines += [f"problem: {p}" for p in report.problems] + [f"note: {n}" for n in report.notes]
        verdict = "ok" if report.ok else f"{len(report.problems)} problems"
        lines.append(f"{db.where}: {verdict} ({report.checkpoints_ok} checkpoints verified)")
    return (0 if report.ok else 1), "\n".join(lines) + "\n"


def cmd_gc(args: argparse.Namespace) -> tuple[int, str]:
    with _open(args) as db:
        report = maintenance.gc(db, root=args.root, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    lines = [f"{verb} {path}" for path in report.removed] + [f"kept {why}" for why in report.kept]
    lines.append(f"{verb} {len(report.rows)} checkpoint rows and {len(report.removed)} files "
                 f"({report.bytes_freed / 1e6:.1f} MB)")
    return 0, "\n".join(lines) + "\n"


COMMANDS = {"runs": cmd_runs, "studies": cmd_studies, "show": cmd_show, "export": cmd_export,
            "merge": cmd_merge, "check": cmd_check, "gc": cmd_gc}

if __name__ == "__main__":
    sys.exit(main())

"""Command line: look at an experiment database without writing Python.

    python -m expdb --db experiments.db runs [--study NAME]
    python -m expdb --db experiments.db show RUN
    python -m expdb --db experiments.db export RUN --format csv|json [--table T] [--out FILE]

Errors print one line to stderr and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

import expdb
from expdb.errors import ExpdbError
from expdb.values import jsonable

TABLES = ("steps", "evals", "epochs", "checkpoints", "events")
_RUN_COLUMNS = ["id", "name", "status", "study_name", "trial_number", "n_params", "best_val_loss",
                "best_step", "n_steps", "n_epochs", "duration_s", "started_at"]
_EPOCH_COLUMNS = ["epoch", "step", "train_loss", "val_loss", "val_ppl", "lr", "epoch_seconds",
                  "tokens_per_s"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m expdb", description="Read an experiment database.")
    parser.add_argument("--db", default="experiments.db",
                        help="SQLite file or SQLAlchemy URL (default: experiments.db)")
    sub = parser.add_subparsers(dest="command", required=True)
    runs = sub.add_parser("runs", help="list the runs")
    runs.add_argument("--study", help="only the runs of this study")
    show = sub.add_parser("show", help="one run's record and its epochs")
    show.add_argument("run", type=int, help="run id")
    export = sub.add_parser("export", help="write a run's history as CSV or JSON")
    export.add_argument("run", type=int, help="run id")
    export.add_argument("--format", choices=("csv", "json"), required=True)
    export.add_argument("--table", choices=TABLES,
                        help="which history (csv default: steps; json default: the record and all of them)")
    export.add_argument("--out", type=Path, help="file to write (default: standard output)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with expdb.open(args.db, create=False) as db:
            text = COMMANDS[args.command](db, args)
        if getattr(args, "out", None):
            args.out.write_text(text, encoding="utf-8")
        else:
            sys.stdout.write(text)
    except ExpdbError as exc:
        print(f"expdb: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:      # --out in a missing directory, a closed pipe, ...
        print(f"expdb: error: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_runs(db: expdb.ExperimentDB, args: argparse.Namespace) -> str:
    df = db.runs(args.study)
    if df.empty:
        return f"no runs in {db.where}\n"
    return df[_RUN_COLUMNS].to_string(index=False) + "\n"


def cmd_show(db: expdb.ExperimentDB, args: argparse.Namespace) -> str:
    record = db.run(args.run)
    lines = []
    for name, value in record.as_dict().items():
        if isinstance(value, dict):
            value = json.dumps(value, indent=2, default=str).replace("\n", "\n  ")
        lines.append(f"{name}: {value}")
    epochs = db.epochs(args.run)
    lines.append("")
    lines.append(epochs[_EPOCH_COLUMNS].to_string(index=False) if len(epochs) else "(no epochs recorded)")
    return "\n".join(lines) + "\n"


def cmd_export(db: expdb.ExperimentDB, args: argparse.Namespace) -> str:
    if args.format == "csv":
        df = _table(db, args.run, args.table or "steps")
        if "detail" in df:
            df["detail"] = [json.dumps(jsonable(d)) for d in df["detail"]]
        return df.to_csv(index=False)
    tables = [args.table] if args.table else list(TABLES)
    document = {"run": db.run(args.run).as_dict()} if not args.table else {}
    for name in tables:
        document[name] = _table(db, args.run, name).to_dict(orient="records")
    # Strict JSON: non-finite floats are written as the strings "nan", "inf", "-inf".
    return json.dumps(jsonable(document), indent=2, allow_nan=False) + "\n"


def _table(db: expdb.ExperimentDB, run_id: int, name: str) -> pd.DataFrame:
    return getattr(db, name)(run_id)


COMMANDS = {"runs": cmd_runs, "show": cmd_show, "export": cmd_export}

if __name__ == "__main__":
    sys.exit(main())

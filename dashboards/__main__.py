"""python -m dashboards: pictures and tables of runs and studies, from the experiment database.

    python -m dashboards --run 7 --out dashboard.png          six panels, PNG (150 dpi) or .html
    python -m dashboards --run 7 --out dashboard.png --watch 30     re-render while it trains
    python -m dashboards --run 7 --table metrics.csv          epoch + eval metrics, .csv or .json
    python -m dashboards --study S --out compare.html         trials compared, .png or .html
    python -m dashboards --study S --report report.html       Optuna's plots + the trials table
    python -m dashboards --study S --table trials.json        one row per trial
    python -m dashboards --runs 3 7 9 --out compare.png       any runs, across studies
    python -m dashboards --runs 3 7 --metric val_bpb          compared in bits per byte

HTML pages load plotly.js from plotly.min.js, written once beside them (offline, shared by
every page in the folder); --plotlyjs inline makes one self-contained file instead.
Every problem is one line on stderr naming the flag, the value and the fix, with exit code 2;
all checks and reads run before anything is written.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from dashboards.errors import ReportError, UsageError
from dashboards.compare_data import METRICS
from dashboards.output import PLOTLYJS_MODES

KINDS = {"out": ((".png", ".html"), "--out"), "report": ((".html",), "--report"),
         "table": ((".csv", ".json"), "--table")}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dashboards", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", default="experiments.db",
                   help="Experiment database: a path or a SQLAlchemy URL (default: experiments.db).")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--run", type=int, metavar="ID", help="One run: its six-panel dashboard.")
    what.add_argument("--runs", type=int, nargs="+", metavar="ID", help="Compare these runs.")
    what.add_argument("--study", metavar="NAME", help="Compare the runs of this study.")
    p.add_argument("--out", help="Picture: .png or .html (default dashboard.png for --run, "
                                 "compare.png otherwise, when no --report/--table is given).")
    p.add_argument("--report", metavar="FILE", help="With --study: the study report (.html).")
    p.add_argument("--table", metavar="FILE", help="Metrics as .csv or .json.")
    p.add_argument("--top", type=int, default=10, metavar="K",
                   help="Comparisons: how many best runs get a coloured curve (default: 10).")
    p.add_argument("--metric", choices=METRICS, default=None,
                   help="Comparisons: rank and draw validation loss or bits per byte (default: val_bpb when "
                        "the runs' tokenizers or vocabulary sizes differ, where losses per token do not "
                        "compare; else val_loss).")
    p.add_argument("--storage", metavar="URL",
                   help="With --report: the Optuna storage (default: the --db database).")
    p.add_argument("--watch", type=float, metavar="SECONDS",
                   help="With --run: re-render --out every SECONDS until the run stops running.")
    p.add_argument("--watch-iterations", type=int, help=argparse.SUPPRESS)   # tests: bound the loop
    p.add_argument("--plotlyjs", choices=PLOTLYJS_MODES, default="directory",
                   help="HTML: plotly.min.js beside the page (directory, default) or inside it.")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        outputs = check_args(args)           # before the database: bad flags touch nothing
        db = open_db(args.db)
        writers = prepare(db, args, outputs)  # every read and check; nothing written yet
        if args.watch:
            return watch(db, args, outputs["out"])
        for name, write in writers:
            write()
            print(f"wrote {name}")
    except (UsageError, ReportError) as e:
        print("\n".join(f"error: {line}" for line in str(e).splitlines()), file=sys.stderr)
        return 2
    return 0


def check_args(args: argparse.Namespace) -> dict[str, Path]:
    """The output paths by kind; raises one UsageError listing every problem, one per line."""
    mode = "--run" if args.run is not None else "--runs" if args.runs else "--study"
    given = {k: getattr(args, k) for k in KINDS if getattr(args, k)}
    if not given:
        given = {"out": "dashboard.png" if mode == "--run" else "compare.png"}
    problems = [p for kind, value in given.items() for p in _check_path(kind, value)]
    if "report" in given and mode != "--study":
        problems.append(f"--report {given['report']}: a report is of a study; use --study NAME")
    if args.storage is not None and "report" not in given:
        problems.append(f"--storage {args.storage}: only used with --report; add --report FILE")
    elif args.storage is not None and "://" not in args.storage:
        problems.append(f"--storage {args.storage}: not a URL; use e.g. sqlite:///experiments.db")
    if args.top < 1:
        problems.append(f"--top {args.top}: use a positive number of runs, e.g. --top 10")
    if args.metric is not None and (mode == "--run" or "out" not in given):
        problems.append(f"--metric {args.metric}: picks what a comparison draws; use it with --runs or --study "
                        "and --out FILE")
    problems += _check_watch(args, mode, given)
    paths = [Path(v).resolve() for v in given.values()]
    if len(set(paths)) < len(paths):
        problems.append(f"{' '.join(given.values())}: two outputs have the same name; use different files")
    if problems:
        raise UsageError("\n".join(problems))
    return {k: Path(v) for k, v in given.items()}


def _check_path(kind: str, value: str) -> list[str]:
    allowed, flag = KINDS[kind]
    path = Path(value)
    if path.suffix.lower() not in allowed:
        return [f"{flag} {value}: writes {' or '.join(allowed)} files, not "
                f"{path.suffix or 'a name without extension'}; use e.g. {flag} "
                f"{path.with_suffix(allowed[0]).name}"]
    if not path.parent.is_dir():
        return [f"{flag} {value}: directory {path.parent} does not exist; create it first or "
                "write elsewhere"]
    if path.is_dir():
        return [f"{flag} {value}: is a directory; pass a file name such as {path / ('dashboard' + allowed[0])}"]
    return []


def _check_watch(args: argparse.Namespace, mode: str, given: dict[str, str]) -> list[str]:
    if args.watch is None:
        return [] if args.watch_iterations is None else [
            f"--watch-iterations {args.watch_iterations}: only with --watch"]
    problems = []
    if not args.watch > 0:
        problems.append(f"--watch {args.watch:g}: use a positive number of seconds, e.g. --watch 30")
    if mode != "--run":
        problems.append(f"--watch {args.watch:g}: watches one run; use it with --run ID")
    if set(given) != {"out"}:
        problems.append(f"--watch {args.watch:g}: re-renders --out only; drop "
                        + " and ".join(f"--{k}" for k in given if k != "out"))
    if args.watch_iterations is not None and args.watch_iterations < 1:
        problems.append(f"--watch-iterations {args.watch_iterations}: use 1 or more")
    return problems


def open_db(url: str) -> Any:
    """The database, checked first by reading only: opening an empty file or another program's
    database would create expdb's tables in it."""
    import expdb
    from dashboards.source import open_existing

    if "://" in url or Path(url).is_file():
        try:
            expdb.check_database(url, create=False, write=False)
        except expdb.ExpdbError as e:
            raise UsageError(f"--db {url}: {e}") from e
    return open_existing(url, "--db")


def prepare(db: Any, args: argparse.Namespace, outputs: dict[str, Path]
            ) -> list[tuple[Path, Callable[[], object]]]:
    """Read and check everything; return the writes still to do, in order."""
    from dashboards import render_comparison, render_run
    from dashboards.compare_data import fetch_comparison
    from dashboards.run_data import fetch_run_data
    from dashboards.tables import fetch_table, to_csv, to_json
    from trainer.files import atomic_write_bytes as write_atomic

    ids = known_runs(db, args)
    if args.study is not None and set(outputs) - {"report"}:
        study_runs(db, args.study, args.db)
    writers: list[tuple[Path, Callable[[], object]]] = []
    if "report" in outputs:                     # first: an unknown Optuna study stops all
        writers.append(report_writer(db, args, outputs["report"]))
    if "out" in outputs:
        out = outputs["out"]
        if args.run is not None:
            data = fetch_run_data(db, args.run)
            writers.append((out, lambda: render_run(data, out, args.plotlyjs)))
        else:
            cmp = fetch_comparison(db, ids, args.study, args.top, metric=args.metric)
            writers.append((out, lambda: render_comparison(cmp, out, plotlyjs=args.plotlyjs)))
    if "table" in outputs:
        table, path = fetch_table(db, args.run, args.study, args.runs), outputs["table"]
        payload = to_csv(table) if path.suffix.lower() == ".csv" else to_json(table)
        writers.append((path, lambda: write_atomic(path, payload)))
    return writers


def report_writer(db: Any, args: argparse.Namespace, out: Path) -> tuple[Path, Callable[[], object]]:
    from dashboards.report_data import fetch_report
    from dashboards.report_html import render_report

    data, study = fetch_report(db, args.study, args.storage or db.url)
    return out, lambda: render_report(data, study, out, args.plotlyjs)


def known_runs(db: Any, args: argparse.Namespace) -> list[int] | None:
    """The ids of --run/--runs (duplicates dropped), each checked to exist."""
    flag, run_ids = ("--run", [args.run]) if args.run is not None else ("--runs", args.runs)
    if run_ids is None:
        return None
    unknown = [i for i in run_ids if not _run_exists(db, i)]
    if unknown:
        raise UsageError(f"{flag} {' '.join(map(str, run_ids))}: no run with id "
                         f"{', '.join(map(str, unknown))} in {args.db}; list the runs with "
                         f"`python -m expdb --db {args.db} runs`")
    return list(dict.fromkeys(run_ids))


def _run_exists(db: Any, run_id: int) -> bool:
    try:
        db.run(run_id)
    except LookupError:                    # expdb.errors.UnknownRunError
        return False
    return True


def study_runs(db: Any, study: str, where: str) -> None:
    if not len(db.runs(study)):
        raise UsageError(f"--study {study}: no runs recorded for this study; check the name "
                         f"(`python -m expdb --db {where} runs` lists the studies)")


def watch(db: Any, args: argparse.Namespace, out: Path) -> int:
    from dashboards.live import watch as watch_run

    try:
        watch_run(db, args.run, out, args.watch, args.watch_iterations, args.plotlyjs)
    except KeyboardInterrupt:
        print(f"\nstopped watching; the last dashboard is {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""python -m dashboards: one run's six-panel dashboard, or several runs' validation curves.

    python -m dashboards --db experiments.db --run 7 --out dashboard.png
    python -m dashboards --db experiments.db --runs 3 7 9 --out compare.html
    python -m dashboards --db experiments.db --study width-sweep --top 5 --out compare.png

Every problem is one line on stderr naming the flag, the value and the fix, with exit code 2;
all checks run before anything is written.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from dashboards.compare import build_comparison, fetch_curve, render_comparison
from dashboards.data import fetch_run_data
from dashboards.errors import UsageError
from dashboards.training import render_run_dashboard

STUDY_STATUSES = ("completed", "pruned")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dashboards", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", default="experiments.db",
                   help="Experiment database: a path or a SQLAlchemy URL (default: experiments.db).")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--run", type=int, metavar="ID", help="Six-panel dashboard of this run (PNG).")
    what.add_argument("--runs", type=int, nargs="+", metavar="ID",
                      help="Compare the validation loss of these runs (PNG or HTML).")
    what.add_argument("--study", metavar="NAME",
                      help="Compare the best completed/pruned runs of this study (PNG or HTML).")
    p.add_argument("--top", type=int, default=10, metavar="K",
                   help="With --study: how many runs, best validation loss first (default: 10).")
    p.add_argument("--out", help="Output file: .png for --run (default dashboard.png); .png or "
                                 ".html for --runs/--study (default compare.png).")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        out = check_out(args)              # before the database: a bad --out touches nothing
        if args.top < 1:
            raise UsageError(f"--top {args.top}: use a positive number of runs, e.g. --top 10")
        db = open_db(args.db)
        write(db, args, out)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def check_out(args: argparse.Namespace) -> Path:
    out = Path(args.out or ("dashboard.png" if args.run is not None else "compare.png"))
    allowed = (".png",) if args.run is not None else (".png", ".html")
    if out.suffix.lower() not in allowed:
        mode = "--run" if args.run is not None else "--runs/--study"
        raise UsageError(f"--out {out}: {mode} writes {' or '.join(allowed)} files, not "
                         f"{out.suffix or 'a file without extension'}; use e.g. --out "
                         f"{out.with_suffix(allowed[-1]).name}")
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: directory {out.parent} does not exist; create it first "
                         "or write elsewhere")
    return out


def open_db(url: str) -> Any:
    """Open an existing database; never create one (expdb.open would, for a new path)."""
    import expdb
    from expdb.errors import ExpdbError

    if "://" not in url and not Path(url).is_file():
        raise UsageError(f"--db {url}: no such file; pass the path of an experiment database "
                         "written by the trainer (python -m trainer ...), or a SQLAlchemy URL")
    try:
        return expdb.open(url, create=False)
    except ExpdbError as e:
        raise UsageError(f"--db {url}: {e}") from e


def write(db: Any, args: argparse.Namespace, out: Path) -> None:
    if args.run is not None:
        render_run_dashboard(fetch_run_data(db, _known_runs(db, [args.run], "--run", args.db)[0]), out)
        return
    if args.runs:
        ids, title = _known_runs(db, args.runs, "--runs", args.db), "Validation loss"
    else:
        ids = study_top_runs(db, args.study, args.top, args.db)
        title = f"Study {args.study}: validation loss of the best {len(ids)} runs"
    render_comparison(build_comparison([fetch_curve(db, i) for i in ids], title), out)


def _known_runs(db: Any, run_ids: list[int], flag: str, where: str) -> list[int]:
    unknown = [i for i in run_ids if not _run_exists(db, i)]
    if unknown:
        raise UsageError(f"{flag} {' '.join(map(str, run_ids))}: no run with id "
                         f"{', '.join(map(str, unknown))} in {where}; list the runs with "
                         f"`python -m expdb --db {where} runs`")
    return run_ids


def _run_exists(db: Any, run_id: int) -> bool:
    try:
        db.run(run_id)
    except LookupError:                    # expdb.errors.UnknownRunError
        return False
    return True


def study_top_runs(db: Any, study: str, top: int, where: str = "experiments.db") -> list[int]:
    """Ids of the study's completed/pruned runs, lowest best_val_loss first, at most ``top``."""
    runs = db.study(study)
    if not len(runs):
        raise UsageError(f"--study {study}: no runs recorded for this study; check the name "
                         f"(`python -m expdb --db {where} runs` lists the studies)")
    done = runs[runs["status"].isin(STUDY_STATUSES)]
    if not len(done):
        seen = ", ".join(sorted(set(runs["status"].astype(str))))
        raise UsageError(f"--study {study}: no completed or pruned runs yet ({len(runs)} "
                         f"run{'s' if len(runs) != 1 else ''}: {seen}); wait for a trial to finish")
    id_col = "run_id" if "run_id" in done.columns else "id"
    done = done.sort_values("best_val_loss", na_position="last", kind="stable")
    return [int(i) for i in done[id_col].head(top)]


if __name__ == "__main__":
    sys.exit(main())

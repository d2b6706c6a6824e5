"""python -m studies.search: an Optuna study whose trials are trainer runs.

    python -m studies.search --trials 10

The study lives in the experiment database's file unless --storage names another; running
the same command again continues the same study until it has --trials finished trials.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from trainer.cli import Parser, fail, parse_bool

PROG = "python -m studies.search"


def build_parser() -> Parser:
    p = Parser(prog=PROG, description="Search hyperparameters with Optuna; every trial is a recorded trainer run.")
    p.add_argument("--trials", type=int, default=10, metavar="N",
                   help="Finish when the study has N finished trials (completed, pruned or failed), "
                        "counting earlier invocations (default: 10).")
    p.add_argument("--study-name", default=None, metavar="S", help="Study name (default: the preset's name).")
    p.add_argument("--db", default="experiments.db", metavar="URL",
                   help="Experiment database: SQLite path or SQLAlchemy URL (default: experiments.db).")
    p.add_argument("--storage", default=None, metavar="URL",
                   help="Optuna storage URL (default: the experiment database's file).")
    p.add_argument("--preset", default=None, metavar="NAME",
                   help="Training preset of every trial (default: quick without a GPU, kaggle-t4 with one).")
    p.add_argument("--config", default=None, metavar="FILE", help="YAML/JSON settings applied over the preset.")
    p.add_argument("--out", default="runs", metavar="DIR", help="Trials write to DIR/STUDY/trial-NNNN (default: runs).")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="Seed of the sampler (default: 0).")
    p.add_argument("--progress", type=parse_bool, default=True, metavar="BOOL",
                   help="Show each trial's progress bar (default: true).")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.trials < 1:
        fail(PROG, ValueError(f"--trials {args.trials}: use a positive number of trials, e.g. --trials 10"))
    from trainer.cli import config_from_args
    from trainer.errors import TrainerError
    try:
        base = config_from_args(preset_args(args))
    except TrainerError as exc:
        fail(PROG, exc)
    # Heavy imports (torch, optuna) only once the flags are known to be good.
    from studies.runner import run_study
    try:
        return run_study(args, base)
    except TrainerError as exc:
        fail(PROG, exc)


def preset_args(args: argparse.Namespace) -> argparse.Namespace:
    """The trainer's view of our flags: --preset and --config only."""
    return argparse.Namespace(preset=args.preset, config=args.config, cfg_progress=args.progress)


if __name__ == "__main__":
    start = time.perf_counter()
    code = main()
    print(f"done in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    sys.exit(code)

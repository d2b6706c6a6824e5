"""python -m trainer: train one model and record it in the experiment database.

The command line reaches the database (--db) through ``trainer.recorder.Database``, found by
name among the installed entry points (expdb registers itself): no module of the trainer
imports database code, and the training code itself only knows the Recorder protocol.
"""
from __future__ import annotations

import sys
from pathlib import Path

from trainer.cli import (Parser, add_config_flags, collect_problems, config_from_args, database_check,
                         environment_checks, fail, raise_problems)
from trainer.errors import EXIT_FAILED, EXIT_TIME_BUDGET, ConfigError, RankLost, TrainerError, TrainingInterrupted
from trainer.recorder import find_database

PROG = "python -m trainer"


def build_parser() -> Parser:
    parser = Parser(prog=PROG, description="Train a GPT-2-style language model.")
    parser.add_argument("--out", dest="cfg_out_dir", metavar="DIR",
                        help="Directory for checkpoints and the final model (default: runs/run).")
    parser.add_argument("--db", default="experiments.db", metavar="URL",
                        help="Experiment database: a SQLite path or a SQLAlchemy URL (default: experiments.db).")
    parser.add_argument("--db-shared", action="store_true",
                        help="Record into --db even though it holds another program's tables and none of this "
                             "project's (this project's tables are added beside them); without it such a file "
                             "is refused.")
    parser.add_argument("--no-db", action="store_true", help="Record nothing in a database.")
    parser.add_argument("--continue-from", nargs="+", default=None, metavar="DIR",
                        help="An earlier session's session-pack/ or run folder, read in place: its database is "
                             "merged into --db and the run resumes from its newest valid checkpoint there.")
    add_config_flags(parser, skip={"out_dir"})
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cfg_out_dir is None:
        del args.cfg_out_dir
    try:
        cfg = config_from_args(args)  # checked before the heavy imports: bad flags answer at once
    except TrainerError as exc:
        fail(PROG, exc)
    if args.continue_from:
        from trainer.pack import continued_config
        cfg = continued_config(cfg, args.continue_from)   # --resume auto, searching the inputs too
    refuse_before_writing(cfg, args)
    from trainer.clock import SimulatedTime
    from trainer.data import prepare_data
    from trainer.run import train
    time_source = SimulatedTime.from_env()   # read once, here; None: real time
    try:
        # The first write (the token cache), after every check passed; rank 0 alone reports it.
        data = prepare_data(cfg, log=print if _is_main_process() else (lambda *_: None))
        if args.continue_from and not args.no_db and _is_main_process():
            from trainer.pack import merge_inputs
            merge_inputs(args.continue_from, args.db)
        recorder = None if args.no_db or not _is_main_process() else _open_recorder(args.db, cfg)
        result = train(cfg, recorder, data=data, time_source=time_source)
    except TrainerError as exc:
        fail(PROG, exc)
    except TrainingInterrupted as stop:
        print(f"{PROG}: {stop}", file=sys.stderr)
        return stop.exit_code
    except RankLost as lost:     # already recorded as failed; torchrun names the rank that died
        print(f"{PROG}: {lost}", file=sys.stderr)
        return EXIT_FAILED
    if result.status == "interrupted":
        print(f"interrupted: run {result.run_id} at step {result.steps} ({result.reason}); "
              f"resume from {result.final_checkpoint} with --resume auto")
        return EXIT_TIME_BUDGET
    print(f"{result.status}: run {result.run_id}, {result.steps} steps, best val loss "
          f"{result.best_val_loss:.4f} ({result.best_val_bpb:.4f} bits per byte); final model: {result.final_model}")
    if result.status == "failed":   # diverged, or out of memory at micro-batch 1
        print(f"{PROG}: the run failed: {result.reason}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def refuse_before_writing(cfg, args) -> None:
    """Every check that needs no data, all at once; exit 2 listing each problem, having written nothing."""
    from trainer.checkpoints import precheck_resume

    checks = environment_checks(cfg) + [("", lambda: precheck_resume(cfg))]   # a bad --resume or --out
    if args.continue_from:
        from trainer.pack import input_problems
        checks += [("", lambda d=d: raise_problems(input_problems(Path(d), "--continue-from")))
                   for d in args.continue_from]
    if not args.no_db and _is_main_process():
        checks.append(database_check(args.db, args.db_shared))
    if problems := collect_problems(checks):
        fail(PROG, ConfigError(problems))
    _warn_about_mirrors(cfg, args)


def _warn_about_mirrors(cfg, args) -> None:
    """A tracker that cannot work is a warning, never a stop: the database has the whole run."""
    if cfg.report_to in ("", "none"):
        return
    if args.no_db:
        print(f"warning: --report-to {cfg.report_to} is ignored with --no-db (the mirrors follow the "
              "database's run); drop --no-db to mirror the run", file=sys.stderr)
        return
    for warning in find_database().mirror_warnings(cfg.report_to, cfg.out_dir):
        print(f"warning: {warning}", file=sys.stderr)


def _is_main_process() -> bool:
    """Rank 0 of a torchrun launch (or the only process): the one that writes the database."""
    from trainer.distributed import World
    return World.from_env().is_main


def _open_recorder(url: str, cfg):
    """The database's recorder, with the --report-to mirrors (W&B, TensorBoard) around it."""
    try:
        return find_database().recorder(url, report_to=cfg.report_to, out_dir=cfg.out_dir,
                                        wandb_project=cfg.wandb_project,
                                        warn=lambda message: print(f"warning: {message}", file=sys.stderr))
    except TrainerError as exc:
        fail(PROG, exc)


if __name__ == "__main__":
    sys.exit(main())

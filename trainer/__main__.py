"""python -m trainer: train one model and record it in the experiment database.

This is the composition root of the command line: the one place in the trainer package
that opens an expdb recorder. The training code itself only knows the Recorder protocol.
"""
from __future__ import annotations

import sys

from trainer.cli import Parser, add_config_flags, collect_problems, config_from_args, environment_checks, fail
from trainer.errors import EXIT_FAILED, EXIT_TIME_BUDGET, ConfigError, TrainerError, TrainingInterrupted

PROG = "python -m trainer"


def build_parser() -> Parser:
    parser = Parser(prog=PROG, description="Train a GPT-2-style language model.")
    parser.add_argument("--out", dest="cfg_out_dir", metavar="DIR",
                        help="Directory for checkpoints and the final model (default: runs/run).")
    parser.add_argument("--db", default="experiments.db", metavar="URL",
                        help="Experiment database: a SQLite path or a SQLAlchemy URL (default: experiments.db).")
    parser.add_argument("--no-db", action="store_true", help="Record nothing in a database.")
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
    refuse_before_writing(cfg, args)
    from trainer.clock import SimulatedTime
    from trainer.data import prepare_data
    from trainer.run import train
    time_source = SimulatedTime.from_env()   # read once, here; None: real time
    try:
        data = prepare_data(cfg)  # the first write (the token cache), after every check passed
        recorder = None if args.no_db else _open_recorder(args.db)
        result = train(cfg, recorder, data=data, time_source=time_source)
    except TrainerError as exc:
        fail(PROG, exc)
    except TrainingInterrupted as stop:
        print(f"{PROG}: {stop}", file=sys.stderr)
        return stop.exit_code
    if result.status == "interrupted":
        print(f"interrupted: run {result.run_id} at step {result.steps} ({result.reason}); "
              f"resume from {result.final_checkpoint} with --resume auto")
        return EXIT_TIME_BUDGET
    print(f"{result.status}: run {result.run_id}, {result.steps} steps, best val loss "
          f"{result.best_val_loss:.4f}; final model: {result.final_model}")
    if result.status == "failed":   # diverged, or out of memory at micro-batch 1
        print(f"{PROG}: the run failed: {result.reason}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def refuse_before_writing(cfg, args) -> None:
    """Every check that needs no data, all at once; exit 2 listing each problem, having written nothing."""
    import expdb
    from trainer.checkpoints import precheck_resume

    checks = environment_checks(cfg) + [("", lambda: precheck_resume(cfg))]   # a bad --resume or --out
    if not args.no_db:
        checks.append((f"--db {args.db!r}: ", lambda: expdb.check_database(args.db, create=True, write=True)))
    if problems := collect_problems(checks, errors=(TrainerError, expdb.ExpdbError)):
        fail(PROG, ConfigError(problems))


def _open_recorder(url: str):
    import expdb
    try:
        return expdb.open(url).recorder()
    except expdb.ExpdbError as exc:
        fail(PROG, exc)


if __name__ == "__main__":
    sys.exit(main())

"""python -m trainer: train one model and record it in the experiment database.

This is the composition root of the command line: the one place in the trainer package
that opens an expdb recorder. The training code itself only knows the Recorder protocol.
"""
from __future__ import annotations

import sys

from trainer.cli import Parser, add_config_flags, config_from_args, fail
from trainer.errors import TrainerError

PROG = "python -m trainer"


def build_parser() -> Parser:
    parser = Parser(prog=PROG, description="Train a GPT-2-style language model.")
    parser.add_argument("--out", dest="cfg_out_dir", metavar="DIR",
                        help="Directory for checkpoints and the final model (default: runs/run).")
    parser.add_argument("--db", default="experiments.db", metavar="URL",
                        help="Experiment database: a SQLite path or a SQLAlchemy URL (default: experiments.db).")
    parser.add_argument("--no-db", action="store_true", help="Record nothing in a database.")
    parser.add_argument("--resume", default=None, metavar="PATH", help="Continue from this checkpoint directory.")
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
    from trainer.data import prepare_data
    from trainer.loop import train
    try:
        data = prepare_data(cfg)  # before the database is touched: bad data writes nothing
        recorder = None if args.no_db else _open_recorder(args.db)
        result = train(cfg, recorder, data=data, resume=args.resume)
    except TrainerError as exc:
        fail(PROG, exc)
    print(f"{result.status}: run {result.run_id}, {result.steps} steps, best val loss "
          f"{result.best_val_loss:.4f}; final model: {result.final_model}")
    return 0


def _open_recorder(url: str):
    import expdb
    try:
        return expdb.open(url).recorder()
    except expdb.ExpdbError as exc:
        fail(PROG, exc)


if __name__ == "__main__":
    sys.exit(main())

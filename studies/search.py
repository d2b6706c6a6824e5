"""python -m studies.search: an Optuna study whose trials are trainer runs.

    python -m studies.search --trials 10

The study lives in the experiment database's file unless --storage names another; running
the same command again continues the same study until it has --trials finished trials.
"""
from __future__ import annotations

import argparse
import re
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
    p.add_argument("--db-shared", action="store_true",
                   help="Record into --db even though it holds another program's tables and none of this "
                        "project's or Optuna's (ours are added beside them); without it such a file is refused.")
    p.add_argument("--storage", default=None, metavar="URL",
                   help="Optuna storage URL (default: the experiment database's file).")
    p.add_argument("--preset", default=None, metavar="NAME",
                   help="Training preset of every trial (default: quick without a GPU, kaggle-t4 with one).")
    p.add_argument("--config", default=None, metavar="FILE", help="YAML/JSON settings applied over the preset.")
    p.add_argument("--out", default="runs", metavar="DIR", help="Trials write to DIR/STUDY/trial-NNNN (default: runs).")
    p.add_argument("--space", default=None, metavar="FILE",
                   help="YAML search space (setting: {type: float|int|categorical, low, high, log, step, choices}); "
                        "default: the preset's space.")
    p.add_argument("--sampler", default="tpe", choices=("tpe", "random", "cmaes", "grid"),
                   help="Optuna sampler (default: tpe, seeded by --seed).")
    p.add_argument("--pruner", default="median", choices=("median", "hyperband", "none"),
                   help="Optuna pruner (default: median, never before the first epoch ends).")
    p.add_argument("--objective", default=None, choices=("val_bpb", "val_loss"),
                   help="What the study minimises: the trial's best validation loss (nats per token) or the "
                        "validation bits per byte at that step, which compares tokenizers (default: val_bpb "
                        "when the space searches tokenizer or vocab_size, where val_loss is refused; else val_loss).")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="Seed of the sampler (default: 0).")
    p.add_argument("--timeout", type=parse_duration, default=None, metavar="DURATION",
                   help="Start no trial after this long (e.g. 45m, 2h).")
    p.add_argument("--time-budget", type=parse_duration, default=None, metavar="DURATION",
                   help="This session's time (e.g. 8h30m): no trial starts that cannot finish in it, and the "
                        "running trial checkpoints and stops before it ends; the next invocation continues it.")
    p.add_argument("--n-jobs", type=int, default=1, metavar="K", help="Trials run in parallel in this process.")
    p.add_argument("--devices", default=None, metavar="LIST",
                   help="GPUs the --n-jobs workers train on, one trial per GPU at a time, e.g. cuda:0,cuda:1 "
                        "(default: every visible GPU). Without a GPU the workers share the CPU cores.")
    p.add_argument("--max-failures", type=int, default=3, metavar="M",
                   help="Stop after M failed trials in this session (default: 3).")
    p.add_argument("--stale-after", type=parse_duration, default=300.0, metavar="DURATION",
                   help="A running trial of another machine whose run has written nothing for this long is "
                        "taken over (default: 5m). On this machine a dead worker is detected at once.")
    p.add_argument("--progress", type=parse_bool, default=True, metavar="BOOL",
                   help="Show each trial's progress bar (default: true).")
    add_session_flags(p)
    return p


def add_session_flags(p: Parser) -> None:
    """Sessions (continuing, disk), trackers and the lr finder: what a study adds around its trials."""
    p.add_argument("--continue-from", nargs="+", default=None, metavar="DIR",
                   help="Earlier sessions' session-pack/ or output folders, read in place: their databases are "
                        "merged into --db and their unfinished trials resume from their checkpoints (on Kaggle, "
                        "default: the packs under /kaggle/input).")
    p.add_argument("--max-disk-gb", type=float, default=None, metavar="G",
                   help="Study-wide disk budget: a finished trial's checkpoints are removed, and a trial starts "
                        "only if its checkpoints and the session pack fit (default: 18 on Kaggle, none elsewhere).")
    p.add_argument("--lr-from-finder", default=None, metavar="DIR",
                   help="Search lr over a decade around the suggestion of `python -m trainer.lr_find --out DIR` "
                        "(a --space that sets lr keeps precedence).")
    p.add_argument("--report-to", default=None, metavar="LIST",
                   help="Mirror every trial to trackers too: none, or a comma list of tensorboard and wandb "
                        "(one W&B run per trial, grouped by study; WANDB_MODE=offline without a network).")
    p.add_argument("--wandb-project", default=None, metavar="P", help="W&B project (default: the study name).")
    p.add_argument("--keep-best-trials", type=int, default=3, metavar="K",
                   help="With --max-disk-gb: keep the final_model/ of the K best trials only (default: 3).")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from studies.sessions import session_defaults
    args = session_defaults(args)   # on Kaggle: --continue-from /kaggle/input packs, --max-disk-gb 18
    args.argv = list(sys.argv[1:] if argv is None else argv)   # the next session's command (the pack)
    from trainer.errors import ConfigError, TrainerError
    if problems := _flag_problems(args):
        fail(PROG, ConfigError(problems))
    from trainer.cli import config_from_args
    from studies.objective import choose_objective, objective_problems
    from studies.space import default_space, load_space, space_problems, vocabulary_problems
    try:
        base = config_from_args(preset_args(args))
        space = load_space(args.space) if args.space else None  # None: the preset's default
        if args.lr_from_finder:
            from studies.space import with_finder_lr
            space = with_finder_lr(space, args.preset or default_preset_name(), args.lr_from_finder)
        searched = space if space is not None else default_space(args.preset or default_preset_name())
        names = [p.name for p in searched]
        problems = space_problems(searched, args.sampler) + vocabulary_problems(searched, base)
        if problems := problems + objective_problems(args.objective, names):
            raise ConfigError(problems)
        args.objective = choose_objective(args.objective, names)
    except TrainerError as exc:
        fail(PROG, exc)
    refuse_before_writing(args, base)
    # Heavy imports (torch, optuna) only once the flags are known to be good.
    from studies.runner import run_study
    from trainer.clock import SimulatedTime
    from trainer.errors import TrainingInterrupted
    try:
        return run_study(args, base, space, time_source=SimulatedTime.from_env())  # read once, here
    except TrainerError as exc:
        fail(PROG, exc)
    except TrainingInterrupted as exc:
        print(f"{PROG}: {exc}; the trial is left running: run the same command again to continue it",
              file=sys.stderr)
        return exc.exit_code


def refuse_before_writing(args: argparse.Namespace, base) -> None:
    """Every check that needs no data, all at once, before the token cache, the database, the
    study's lock file or its folders exist; exit 2 listing each problem."""
    import expdb
    from trainer.cli import collect_problems, environment_checks
    from trainer.config import folder_problem
    from trainer.errors import ConfigError, TrainerError

    checks = environment_checks(base) + [
        (f"--db {args.db!r}: ", lambda: expdb.check_database(args.db, create=True, write=True,
                                                             shared=getattr(args, "db_shared", False)))]
    if args.storage:
        checks.append((f"--storage {args.storage!r}: ", lambda: expdb.check_storage_file(args.storage)))
    problems = collect_problems(checks, errors=(TrainerError, expdb.ExpdbError)) + device_problems(args.devices)
    if problem := folder_problem(Path(args.out)):
        problems.append(f"--out {args.out!r}: {problem}")
    study_name = args.study_name or args.preset or default_preset_name()
    if args.continue_from:
        from studies.sessions import continue_problems
        problems += continue_problems(args.continue_from, study_name, args.db)
    if not problems:          # the storage is readable: a study it holds keeps its objective
        problems += study_objective_problems(args, study_name)
    if problems:
        fail(PROG, ConfigError(problems))
    if base.report_to not in ("", "none"):     # warnings only: a tracker never stops a study
        from expdb.mirrors import check_report_to
        for warning in check_report_to(base.report_to, Path(args.out)):
            print(f"warning: {warning}", file=sys.stderr)


def study_objective_problems(args: argparse.Namespace, study_name: str) -> list[str]:
    """An existing study minimising another objective than this command's (set by main)."""
    from studies.context import storage_url_for
    from studies.objective import mismatch_problem, stored_objective

    recorded = stored_objective(args.storage or storage_url_for(args.db), study_name)
    problem = mismatch_problem(study_name, recorded, getattr(args, "objective", None) or "val_loss")
    return [problem] if problem else []


def _flag_problems(args: argparse.Namespace) -> list[str]:
    checks = [
        (args.trials >= 1, f"--trials {args.trials}: use a positive number of trials, e.g. --trials 10"),
        (args.n_jobs >= 1, f"--n-jobs {args.n_jobs}: use 1 or more parallel trials"),
        (args.study_name is None or study_name_ok(args.study_name),
         f"--study-name {args.study_name!r}: use a name of letters, digits, '-', '_' or '.' "
         "(it names the study's folder under --out), e.g. --study-name quick-lr"),
        (args.devices is None or all(d.strip()[:5] == "cuda:" and d.strip()[5:].isdigit()
                                     for d in args.devices.split(",")),
         f"--devices {args.devices!r}: list GPUs as cuda:0,cuda:1"),
        (args.max_failures >= 1, f"--max-failures {args.max_failures}: use 1 or more"),
        (args.max_disk_gb is None or args.max_disk_gb > 0,
         f"--max-disk-gb {args.max_disk_gb}: use a positive number of GB, e.g. --max-disk-gb 18"),
        (args.keep_best_trials >= 1, f"--keep-best-trials {args.keep_best_trials}: use 1 or more (the best "
                                     "trial's final model is what a study is for)"),
    ]
    return [message for ok, message in checks if not ok]


def study_name_ok(name: str) -> bool:
    """The name is a folder under --out (and a W&B group): plain characters, not '.' or '..'."""
    return re.fullmatch(r"[A-Za-z0-9._-]+", name) is not None and name not in (".", "..")


def device_problems(devices: str | None) -> list[str]:
    """--devices naming GPUs this machine does not have (torch's count of visible ones)."""
    if devices is None:
        return []
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    missing = [d.strip() for d in devices.split(",") if int(d.strip()[5:]) >= count]
    if not missing:
        return []
    have = f"only cuda:0..cuda:{count - 1}" if count else "no GPU that torch can use"
    return [f"--devices {devices!r}: {', '.join(missing)} not found (this machine has {have}); "
            "drop --devices to use every visible GPU, or the CPU where there is none"]


def parse_duration(text: str) -> float:
    """Seconds in '8h30m', '45m', '90s' (trainer.clock's format, shared with --time-budget of a run)."""
    from trainer.clock import parse_duration as parse

    try:
        return parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None


def default_preset_name() -> str:
    from trainer.presets import default_preset
    return default_preset()


def preset_args(args: argparse.Namespace) -> argparse.Namespace:
    """The trainer's view of our flags: --preset and --config only."""
    trainer_flags = {"cfg_progress": args.progress}
    if args.report_to is not None:
        trainer_flags["cfg_report_to"] = args.report_to
    if args.wandb_project is not None:
        trainer_flags["cfg_wandb_project"] = args.wandb_project
    return argparse.Namespace(preset=args.preset, config=args.config, **trainer_flags)


if __name__ == "__main__":
    start = time.perf_counter()
    code = main()
    print(f"done in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    sys.exit(code)

"""python -m studies.report --study S: the top trials, the best parameters, their importances,
and the best configuration as a file that ``python -m trainer --config FILE`` trains again."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from trainer.cli import Parser, fail

PROG = "python -m studies.report"
# Settings of a trial that say where it ran, not what it learned: reset for a new run.
WHERE_IT_RAN = {"out_dir": "runs/best", "run_name": "", "resume": "", "resume_from": [], "save_on_eval": False,
                "deadline": "", "time_budget": ""}


def build_parser() -> Parser:
    p = Parser(prog=PROG, description="Summarise a study and write its best configuration.")
    p.add_argument("--study", required=True, metavar="S", help="Study name.")
    p.add_argument("--db", default="experiments.db", metavar="URL", help="Experiment database (default: experiments.db).")
    p.add_argument("--storage", default=None, metavar="URL", help="Optuna storage (default: the database's file).")
    p.add_argument("--top", type=int, default=10, metavar="K", help="Trials in the table (default: 10).")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="Where to write best_config.yaml and report.html (default: runs/STUDY).")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    refuse_before_writing(args)
    import optuna

    import expdb
    from studies.context import storage_url_for
    from studies.objective import LABELS, UNITS, recorded_objective
    from studies.results import results_table

    storage = args.storage or storage_url_for(args.db)
    study = optuna.load_study(study_name=args.study, storage=storage)
    objective = recorded_objective(study.user_attrs, bool(study.trials)) or "val_loss"
    db = expdb.open(args.db, create=False)
    table = results_table(study, objective, db.runs(args.study))
    print(f"objective: {objective} ({UNITS[objective]}), lowest first")
    print(table.sort_values(objective).head(args.top).to_string(index=False))
    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not completed:
        print("no completed trial yet: nothing to write")
        return 0
    out = Path(args.out or Path("runs") / args.study)
    best = study.best_trial
    print(f"best trial {best.number}: {LABELS[objective]} {best.value:.4f}; parameters: "
          + ", ".join(f"{k}={v}" for k, v in best.params.items()))
    _print_importances(study, completed)
    path = write_best_config(db.run(best.user_attrs["run_id"]).config, out / "best_config.yaml")
    print(f"best configuration: {path}  (train it again: python -m trainer --config {path} --epochs N)")
    from dashboards import write_study_report
    print(f"report: {write_study_report(args.db, args.study, out / 'report.html', storage=storage)}")
    return 0


def refuse_before_writing(args) -> None:
    """Every check before Optuna opens the storage (which creates its tables in any file it
    opens) and before --out is made: exit 2 listing each problem, having written nothing."""
    import expdb
    from trainer.config import folder_problem
    from trainer.errors import ConfigError

    problems = [] if args.top >= 1 else [f"--top {args.top}: use 1 or more"]
    out = args.out or str(Path("runs") / args.study)
    if problem := folder_problem(Path(out)):
        problems.append(f"--out {out!r}: {problem}")
    try:
        expdb.check_database(args.db, create=False, write=False)
    except expdb.ExpdbError as exc:
        problems.append(f"--db {args.db!r}: {exc}")
        if args.storage:                                # a storage of its own is checked all the same
            problems += _study_problems(args, args.storage)
    else:
        problems += _study_problems(args, args.storage or args.db)   # Optuna's tables beside expdb's by default
    if problems:
        fail(PROG, ConfigError(problems))


def _study_problems(args, storage: str) -> list[str]:
    import expdb

    flag = f"--storage {args.storage!r}" if args.storage else f"--db {args.db!r}"
    try:
        names = expdb.study_names(storage)
    except expdb.ExpdbError as exc:
        return [f"{flag}: {exc}"]
    if args.study not in names:
        return [f"--study {args.study!r}: no such study in {flag}; it has {', '.join(names) or 'none'}"]
    return []


def _print_importances(study, completed) -> None:
    import optuna

    if len(completed) < 2:
        print("parameter importances: need at least 2 completed trials")
        return
    try:
        importances = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError) as exc:  # e.g. every completed trial has the same parameters
        print(f"parameter importances: not available ({exc})")
        return
    print("parameter importances: " + ", ".join(f"{k} {v:.2f}" for k, v in importances.items()))


def write_best_config(config: dict[str, Any], path: Path) -> Path:
    """The best run's full configuration, minus where it ran, as YAML."""
    import yaml

    values = {**config, **{k: v for k, v in WHERE_IT_RAN.items() if k in config}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(values, sort_keys=True))
    return path


if __name__ == "__main__":
    sys.exit(main())

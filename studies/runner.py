"""Set up and run a study: config, space and data checked first, then storage, workers, report."""
from __future__ import annotations

import argparse
import datetime as dt
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import optuna
import pandas as pd

import expdb
from studies.context import StudyContext, storage_url_for
from expdb.engine import enable_wal
from studies.disk import GB, DiskBudget
from studies.lock import StudyLock
from studies.sampling import make_sampler
from studies.sessions import merge_inputs
from studies.objective import (LABELS, OBJECTIVE_ATTR, choose_objective, mismatch_problem,
                               recorded_objective)
from studies.space import Param, default_space, space_problems, vocabulary_problems
from studies.trial import RUN_ID_ATTR
from studies.results import results_table
from studies.worker import FINISHED, release, work
from trainer.clock import SimulatedTime, wall_clock
from trainer.config import TrainConfig
from trainer.data import prepare_data
from trainer.errors import ConfigError, TrainingInterrupted
from trainer.metrics import perplexity
from trainer.presets import default_preset
from trainer.schedule import steps_per_epoch

EXIT_TOO_MANY_FAILURES = 3
EXIT_DISK_BUDGET = 4
PACK_ON = {"time budget", "timeout", "disk budget"}   # a session cut short leaves a pack for the next
SETUP_LOCK = "<setup>"   # a lock name no study can have: held while tables are created


def run_study(args: argparse.Namespace, base: TrainConfig, space: list[Param] | None,
              time_source: SimulatedTime | None = None) -> int:
    """``time_source``: the study's and its trials' clock (simulated in tests); None: real time."""
    preset = args.preset or default_preset()
    space = space or default_space(preset)
    if problems := space_problems(space, args.sampler) + vocabulary_problems(space, base):
        raise ConfigError(problems)
    objective = choose_objective(getattr(args, "objective", None), [p.name for p in space])
    data = prepare_data(base)  # a bad data source fails here, before anything is written
    check_tokenizer_choices(space, base)
    study_name = args.study_name or preset
    storage_url = args.storage or storage_url_for(args.db)
    # Several workers may start at once on a new database: one of them creates the tables.
    setup = StudyLock(storage_url, SETUP_LOCK)
    inputs = list(getattr(args, "continue_from", None) or [])
    with setup.held():
        db = expdb.open(args.db)
        came_running = merge_inputs(inputs, args.db, study_name)   # before the study: its history counts
        study = _load_study(args, study_name, storage_url, base, data, space)
        keep_objective(study, objective)
        release(study, came_running, f"continued from {', '.join(inputs)}")
    setup.close()
    max_disk_gb = getattr(args, "max_disk_gb", None)
    ctx = StudyContext(
        study=study, storage_url=storage_url, db=db, base=base, space=space, data=data, study_name=study_name,
        out_dir=Path(args.out) / study_name, n_trials=args.trials, lock=StudyLock(storage_url, study_name),
        seed=args.seed, sampler_name=args.sampler, workdir=db.root or Path("."),
        disk=DiskBudget(max_disk_gb * GB, getattr(args, "keep_best_trials", 3)) if max_disk_gb else None,
        max_failures=args.max_failures, stale_after_s=args.stale_after,
        deadline=wall_clock(time_source).astimezone(dt.timezone.utc) + dt.timedelta(seconds=args.time_budget)
        if args.time_budget else None,
        stop_starting_at=(time_source or time.monotonic)() + args.timeout if args.timeout else None,
        time_source=time_source, objective=objective)
    if ctx.disk is not None:      # what a clean-up killed after the last session's last trial left
        ctx.disk.sweep(ctx)
    print(f"study {study_name!r}: {len(finished_trials(study))} of {args.trials} trials finished "
          f"(storage {storage_url}, {args.n_jobs} worker{'s' if args.n_jobs > 1 else ''})")
    try:
        reasons = _run_workers(ctx, args.n_jobs, trial_devices(getattr(args, "devices", None), args.n_jobs))
    except (TrainingInterrupted, KeyboardInterrupt):
        _write_pack(ctx, args, inputs)      # a signal ends the session: its pack first
        raise
    report(study, db, data, ctx.out_dir, objective)
    if PACK_ON & set(reasons):
        _write_pack(ctx, args, inputs)
    ctx.lock.close()
    return _exit_code(ctx, reasons)


def _write_pack(ctx: StudyContext, args: argparse.Namespace, inputs: list[str]) -> None:
    from studies.pack import next_command, pack_paths, write_study_pack

    if ctx.db.root is None:
        ctx.log("no session pack: the experiment database is on a server, which the next session reaches itself")
        return
    command = next_command(getattr(args, "argv", []), pack_paths(ctx.workdir)[0])
    result = write_study_pack(ctx.db, ctx.study, ctx.out_dir, ctx.workdir, command, ctx.n_trials,
                              [Path(i) for i in inputs])
    from trainer.pack import describe

    ctx.log(describe(result))
    ctx.log(f"next session: {command}")


def trial_devices(devices: str | None, n_jobs: int) -> list[str | None]:
    """The GPU each of the ``n_jobs`` workers trains on (--devices cuda:0,cuda:1; default: every
    visible GPU), taken in turn; None for each on a machine without one (they share the cores)."""
    import torch

    names = [d.strip() for d in devices.split(",") if d.strip()] if devices else \
        [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return [names[k % len(names)] if names else None for k in range(n_jobs)]


def _run_workers(ctx: StudyContext, n_jobs: int, devices: list[str | None]) -> list[str]:
    if n_jobs == 1:
        return [work(ctx, devices[0])]
    # Share the cores: K trials each spinning on all cores' OpenMP threads run many times slower.
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // n_jobs))
    with ThreadPoolExecutor(max_workers=n_jobs, thread_name_prefix="trial-worker") as pool:
        return list(pool.map(lambda k: work(ctx, devices[k]), range(n_jobs)))


def _exit_code(ctx: StudyContext, reasons: list[str]) -> int:
    if "failures" in reasons:
        print(f"stopped after {ctx.failures} failed trials in this session (--max-failures {ctx.max_failures}); "
              "see the fail reasons above, fix the space or config, and run the command again")
        return EXIT_TOO_MANY_FAILURES
    if "disk budget" in reasons:
        print("stopped for the disk budget (see above); the session pack holds what the next session needs")
        return EXIT_DISK_BUDGET
    if {"time budget", "timeout"} & set(reasons):
        left = ctx.n_trials - len(finished_trials(ctx.study))
        print(f"stopped for the time limit with {left} trials to go; run the same command again to continue")
    return 0


def _load_study(args: argparse.Namespace, study_name: str, storage_url: str, base: TrainConfig, data,
                space) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    engine_kwargs = {"connect_args": {"timeout": 60}} if storage_url.startswith("sqlite") else {"pool_pre_ping": True}
    storage = optuna.storages.RDBStorage(storage_url, engine_kwargs=engine_kwargs)
    if storage_url.startswith("sqlite"):      # a --storage file of its own: readers must not block the study
        enable_wal(storage.engine)
    # of the study's own data: a trial of another vocabulary has a few more or fewer steps per epoch
    per_epoch = steps_per_epoch(len(data.train), base)
    return optuna.create_study(study_name=study_name, storage=storage, direction="minimize",
                               sampler=make_sampler(args.sampler, args.seed, space),
                               pruner=make_pruner(args.pruner, per_epoch, base), load_if_exists=True)


def keep_objective(study: optuna.Study, objective: str) -> None:
    """Record the study's objective when it is new; refuse one that minimises another (a study
    merged in from --continue-from, or created meanwhile by another process)."""
    recorded = recorded_objective(study.user_attrs, bool(study.get_trials(deepcopy=False)))
    if problem := mismatch_problem(study.study_name, recorded, objective):
        raise ConfigError([problem])
    if OBJECTIVE_ATTR not in study.user_attrs:
        study.set_user_attr(OBJECTIVE_ATTR, objective)


def check_tokenizer_choices(space: list[Param], base: TrainConfig) -> None:
    """Every pretrained tokenizer a trial may draw loads here (from the local cache when the hub
    is out of reach), so a bad choice stops the study before it starts (DataError), not a trial."""
    from trainer.data.tokenizer import pretrained_tokenizer

    choices = next((p.choices for p in space if p.name == "tokenizer"), ())
    for name in dict.fromkeys(choices):
        if name not in ("bpe", base.tokenizer):        # bpe is trained; the base's was loaded with the data
            pretrained_tokenizer(name, log=lambda *_: None)


def make_pruner(name: str, steps_per_epoch: int, base: TrainConfig) -> optuna.pruners.BasePruner:
    """No pruning before the first epoch ends: every trial gets one full epoch of evidence."""
    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "hyperband":
        total = steps_per_epoch * base.epochs
        return optuna.pruners.HyperbandPruner(min_resource=max(1, steps_per_epoch), max_resource=max(2, total))
    # Optuna prunes from step >= n_warmup_steps on: +1 lets the first epoch end (and be recorded).
    return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=steps_per_epoch + 1)


def finished_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=FINISHED)


def unigram_entropy(tokens: np.ndarray) -> float:
    """Entropy in nats of the token frequencies: the loss of a model that learned only those."""
    counts = np.bincount(np.asarray(tokens))
    p = counts[counts > 0] / len(tokens)
    return float(-(p * np.log(p)).sum())


def report(study: optuna.Study, db, data, out_dir: Path, objective: str = "val_loss") -> None:
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.float_format", "{:.4g}".format):
        print(results_table(study, objective, db.runs(study.study_name)).to_string(index=False))
    completed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not completed:
        print("no completed trial yet")
        return
    best = study.best_trial
    if objective == "val_loss":
        print(f"best trial {best.number}: val loss {best.value:.4f} (perplexity {perplexity(best.value):.2f}); "
              f"unigram entropy of the validation tokens {unigram_entropy(data.val):.4f} nats")
    else:             # nats of the study's base tokenizer would compare with none of its trials
        print(f"best trial {best.number}: {LABELS[objective]} {best.value:.4f} bits per byte")
    print("best parameters: " + ", ".join(f"{k}={v}" for k, v in best.params.items()))
    run_id = best.user_attrs.get(RUN_ID_ATTR)
    if run_id is not None:
        from dashboards import write_run_dashboard
        out_dir.mkdir(parents=True, exist_ok=True)
        path = write_run_dashboard(db, run_id, out_dir / "best_dashboard.png")
        print(f"dashboard of the best run ({run_id}): {path}")

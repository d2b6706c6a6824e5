"""Set up and run a study: config and data checked first, then storage, trials, report."""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import optuna
import pandas as pd

import expdb
from studies.objective import RUN_ID_ATTR, Objective
from studies.space import default_space, space_problems
from trainer.config import TrainConfig
from trainer.data import prepare_data
from trainer.errors import ConfigError, TrainerError
from trainer.presets import default_preset

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)


def run_study(args: argparse.Namespace, base: TrainConfig) -> int:
    preset = args.preset or default_preset()
    space = default_space(preset)
    if problems := space_problems(space):
        raise ConfigError(problems)
    data = prepare_data(base)  # a bad data source fails here, before anything is written
    study_name = args.study_name or preset
    db = expdb.open(args.db)
    study = _load_study(args, study_name, base, data)
    remaining = args.trials - len(finished_trials(study))
    print(f"study {study_name!r}: {len(finished_trials(study))} finished trials, running {max(0, remaining)} more "
          f"(storage {args.storage or storage_url(args.db)})")
    if remaining > 0:
        objective = Objective(base, space, data, db, study_name, Path(args.out) / study_name)
        study.optimize(objective, n_trials=remaining, catch=(TrainerError,), callbacks=[_print_trial])
    _report(study, db, data, Path(args.out) / study_name)
    return 0


def storage_url(db: str) -> str:
    """Optuna's storage defaults to the experiment database's own file or server."""
    return db if "://" in db else f"sqlite:///{db}"


def _load_study(args: argparse.Namespace, study_name: str, base, data) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = args.storage or storage_url(args.db)
    engine_kwargs = {"connect_args": {"timeout": 30}} if url.startswith("sqlite") else {}
    storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
    steps_per_epoch = ((len(data.train) - 1) // base.block_size) // base.effective_batch
    # No pruning before the first epoch ends: every trial gets one full epoch of evidence.
    pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=steps_per_epoch)
    return optuna.create_study(study_name=study_name, storage=storage, direction="minimize",
                               sampler=optuna.samplers.TPESampler(seed=args.seed), pruner=pruner,
                               load_if_exists=True)


def finished_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=FINISHED)


def _print_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    value = f"{trial.value:.4f}" if trial.value is not None else "-"
    print(f"trial {trial.number} {trial.state.name.lower()}: val loss {value} "
          f"(run {trial.user_attrs.get(RUN_ID_ATTR)}, {trial.duration.total_seconds():.1f} s)")


def results_table(study: optuna.Study) -> pd.DataFrame:
    rows = []
    for t in study.get_trials(deepcopy=False):
        loss = t.value if t.value is not None else (t.intermediate_values[max(t.intermediate_values)]
                                                    if t.intermediate_values else math.nan)
        rows.append({"trial": t.number, "state": t.state.name.lower(), "run_id": t.user_attrs.get(RUN_ID_ATTR),
                     "val_loss": loss, "val_ppl": math.exp(loss) if loss < 50 else math.inf,
                     "seconds": t.duration.total_seconds() if t.duration else math.nan, **t.params})
    return pd.DataFrame(rows)


def unigram_entropy(tokens: np.ndarray) -> float:
    """Entropy in nats of the token frequencies: the loss of a model that learned only those."""
    counts = np.bincount(np.asarray(tokens))
    p = counts[counts > 0] / len(tokens)
    return float(-(p * np.log(p)).sum())


def _report(study: optuna.Study, db, data, out_dir: Path) -> None:
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.float_format", "{:.4g}".format):
        print(results_table(study).to_string(index=False))
    completed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not completed:
        print("no completed trial yet")
        return
    best = study.best_trial
    print(f"best trial {best.number}: val loss {best.value:.4f} (perplexity {math.exp(best.value):.2f}); "
          f"unigram entropy of the validation tokens {unigram_entropy(data.val):.4f} nats")
    print("best parameters: " + ", ".join(f"{k}={v}" for k, v in best.params.items()))
    run_id = best.user_attrs.get(RUN_ID_ATTR)
    if run_id is not None:
        from dashboards import write_run_dashboard
        out_dir.mkdir(parents=True, exist_ok=True)
        path = write_run_dashboard(db, run_id, out_dir / "best_dashboard.png")
        print(f"dashboard of the best run ({run_id}): {path}")

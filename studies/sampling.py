"""New trials: a sampler seeded by (--seed, trial number), every parameter drawn at ask time.

One seeded sampler per process restarts its random stream in every process: a study
continued in a new session re-drew the previous session's first configurations, and
workers started with one command drew identical ones. Here each new trial gets a fresh
sampler whose seed is derived from the study's seed and the trial's number, and asks
with every distribution at once (``study.ask(fixed_distributions)``), under the study
lock, so the number is the study's next one. So:

- trial N's draw depends on (seed, N) and the study's finished history, never on how many
  processes, threads or sessions came before: 3 invocations of 2 trials draw the same
  sequence as one invocation of 6;
- two workers never share a stream, as no two trials share a number.
"""
from __future__ import annotations

import numpy as np
import optuna

from studies.space import Param, grid_space


def trial_seed(seed: int, number: int) -> int:
    """The sampler seed of trial ``number``: independent streams for every (seed, number)."""
    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


def make_sampler(name: str, seed: int, space: list[Param]) -> optuna.samplers.BaseSampler:
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if name == "grid":
        return optuna.samplers.GridSampler(grid_space(space), seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def distributions(space: list[Param]) -> dict[str, optuna.distributions.BaseDistribution]:
    """The space as Optuna distributions: the same that ``Param.suggest`` asks for."""
    out: dict[str, optuna.distributions.BaseDistribution] = {}
    for p in space:
        if p.type == "categorical":
            out[p.name] = optuna.distributions.CategoricalDistribution(list(p.choices))
        elif p.type == "int":
            out[p.name] = optuna.distributions.IntDistribution(int(p.low), int(p.high), log=p.log,
                                                                step=int(p.step or 1))
        else:
            out[p.name] = optuna.distributions.FloatDistribution(p.low, p.high, log=p.log, step=p.step)
    return out


def ask_new_trial(study: optuna.Study, sampler_name: str, seed: int, space: list[Param]) -> optuna.Trial:
    """The study's next trial with all its parameters drawn. Call it under the study lock."""
    number = len(study.get_trials(deepcopy=False))
    study.sampler = make_sampler(sampler_name, trial_seed(seed, number), space)
    trial = study.ask(distributions(space))
    if trial.number != number:     # another process asked without the lock: still a unique stream
        optuna.logging.get_logger("studies").warning(
            "trial %d was asked as number %d: another worker ran without the study lock", trial.number, number)
    return trial

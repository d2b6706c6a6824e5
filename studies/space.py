"""Search spaces: the only place where hyperparameter ranges live."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna

from trainer.config import TrainConfig, field_names


@dataclass(frozen=True)
class Param:
    """One searched setting: a float or int range (optionally log-scaled) or a list of choices."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    choices: tuple[Any, ...] | None = None

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)


# micro_batch is searched at a fixed effective batch: grad_accum follows from it.
DEFAULT_SPACES: dict[str, list[Param]] = {
    "quick": [
        Param("lr", 5e-4, 5e-3, log=True),
        Param("warmup_steps", 10, 60, integer=True),
        Param("weight_decay", 0.0, 0.2),
        Param("dropout", 0.0, 0.15),
        Param("n_layer", 1, 3, integer=True),
        Param("n_embd", choices=(96, 128, 160)),
        Param("micro_batch", choices=(8, 16)),
    ],
    "kaggle-t4": [
        Param("lr", 1e-4, 1e-3, log=True),
        Param("warmup_steps", 100, 1000, integer=True),
        Param("weight_decay", 0.0, 0.1),
        Param("dropout", 0.0, 0.2),
        Param("n_layer", 4, 8, integer=True),
        Param("n_embd", choices=(256, 384)),
        Param("micro_batch", choices=(4, 8, 16)),
    ],
}


def default_space(preset: str) -> list[Param]:
    return DEFAULT_SPACES.get(preset, DEFAULT_SPACES["quick"])


def suggest_config(trial: optuna.Trial, space: list[Param], base: TrainConfig) -> dict[str, Any]:
    """The trial's settings: one value per searched parameter, and grad_accum keeping the
    effective batch of ``base`` when micro_batch is searched."""
    values = {p.name: p.suggest(trial) for p in space}
    if "micro_batch" in values and "grad_accum" not in values:
        values["grad_accum"] = max(1, base.effective_batch // values["micro_batch"])
    return values


def space_problems(space: list[Param]) -> list[str]:
    """Every mistake in a space: unknown settings and empty ranges."""
    problems = []
    for p in space:
        if p.name not in field_names():
            problems.append(f"search space parameter {p.name!r} is not a training setting")
        elif p.choices is not None and not p.choices:
            problems.append(f"search space parameter {p.name!r} has no choices")
        elif p.choices is None and not (p.low is not None and p.high is not None and p.low < p.high):
            problems.append(f"search space parameter {p.name!r} has an empty range [{p.low}, {p.high}]")
    return problems

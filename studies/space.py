"""Search spaces: the only place where hyperparameter ranges live.

A space file is YAML mapping each training setting to its distribution::

    lr:         {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
    n_layer:    {type: int, low: 1, high: 4}
    n_embd:     {type: categorical, choices: [96, 128, 160]}
    dropout:    {type: float, low: 0.0, high: 0.2, step: 0.05}
    optimizer:  {type: categorical, choices: [adamw, muon]}
    muon_lr:    {type: float, low: 5.0e-3, high: 5.0e-2, log: true}    # used by the muon trials only
    vocab_size: {type: categorical, choices: [512, 1024, 2048]}         # BPE sizes: the study minimises val_bpb
    tokenizer:  {type: categorical, choices: [bpe, gpt2]}                # bpe, hub names or local directories

Every mistake in the file is reported at once, before any trial starts.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer.config import TrainConfig, field_names
from trainer.errors import ConfigError

if TYPE_CHECKING:
    import optuna

TYPES = ("float", "int", "categorical")
SPEC_KEYS = {"type", "low", "high", "log", "step", "choices"}
# Settings that say where a run goes or what it reads, not how it learns.
NOT_SEARCHABLE = {"out_dir", "cache_dir", "run_name", "resume", "resume_from", "dataset", "dataset_config",
                  "data_files", "text_column", "device", "progress"}
# Settings that change the prepared data (trainer.data.prepare_data): a trial that searches one
# prepares its own token streams instead of sharing the study's.
DATA_FIELDS = ("tokenizer", "vocab_size", "subset", "val_fraction")


@dataclass(frozen=True)
class Param:
    """One searched setting: a float or int range (optionally log-scaled or stepped) or choices."""

    name: str
    type: str = "float"
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] | None = None

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.type == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.type == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def grid_values(self) -> list[Any]:
        """The values a grid search visits; floats need a step."""
        if self.type == "categorical":
            return list(self.choices)
        if self.type == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        count = int(round((self.high - self.low) / self.step)) + 1
        return [self.low + i * self.step for i in range(count)]


# micro_batch is searched at a fixed effective batch: grad_accum follows from it.
DEFAULT_SPACES: dict[str, list[Param]] = {
    "quick": [
        Param("lr", low=5e-4, high=5e-3, log=True),
        Param("muon_lr", low=5e-3, high=5e-2, log=True),     # the presets train with Muon (trainer.presets.RECIPE)
        Param("warmup_steps", "int", 10, 60),
        Param("weight_decay", low=0.0, high=0.2),
        Param("dropout", low=0.0, high=0.15),
        Param("n_layer", "int", 1, 3),
        Param("n_embd", "categorical", choices=(96, 128, 160)),
        Param("micro_batch", "categorical", choices=(8, 16)),
    ],
    "kaggle-t4": [
        Param("lr", low=1e-4, high=1e-3, log=True),
        Param("muon_lr", low=5e-3, high=5e-2, log=True),
        Param("warmup_steps", "int", 100, 1000),
        Param("weight_decay", low=0.0, high=0.1),
        Param("dropout", low=0.0, high=0.2),
        Param("n_layer", "int", 4, 8),
        Param("n_embd", "categorical", choices=(256, 384)),
        Param("micro_batch", "categorical", choices=(4, 8, 16)),
    ],
}


def default_space(preset: str) -> list[Param]:
    return list(DEFAULT_SPACES.get(preset, DEFAULT_SPACES["quick"]))


def with_finder_lr(space: list[Param] | None, preset: str, finder_dir: str) -> list[Param]:
    """``space`` (None: the preset's default) with lr searched around an lr finder's suggestion,
    unless the given space sets lr itself (--space keeps precedence)."""
    from trainer.lr_find import lr_range

    given = space is not None and any(p.name == "lr" for p in space)
    low, high = lr_range(finder_dir)          # a missing finder result: ConfigError naming the flag
    if given:
        return space
    base = [p for p in (space if space is not None else default_space(preset)) if p.name != "lr"]
    return [Param("lr", low=low, high=high, log=True), *base]


def suggest_config(trial: optuna.Trial, space: list[Param], base: TrainConfig) -> dict[str, Any]:
    """The trial's settings: one value per searched parameter, and grad_accum keeping the
    effective batch of ``base`` when micro_batch is searched."""
    values = {p.name: p.suggest(trial) for p in space}
    if "micro_batch" in values and "grad_accum" not in values:
        values["grad_accum"] = max(1, base.effective_batch // values["micro_batch"])
    return values


def load_space(path: str | Path) -> list[Param]:
    """Read and check a YAML space file; one ConfigError lists every mistake."""
    import yaml

    label = f"--space {str(path)!r}"
    if not Path(path).is_file():
        raise ConfigError([f"{label}: no such file; pass a YAML file mapping settings to distributions"])
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError([f"{label}: cannot be parsed ({exc}); fix the YAML syntax"]) from exc
    if not isinstance(raw, dict) or not raw:
        raise ConfigError([f"{label}: expected a mapping of setting: {{type: ..., ...}} with at least one entry"])
    problems: list[str] = []
    space = [p for name, spec in raw.items() if (p := _param(str(name), spec, label, problems))]
    if problems:
        raise ConfigError(problems)
    return space


def _param(name: str, spec: Any, label: str, problems: list[str]) -> Param | None:
    where = f"{label}: parameter {name!r}"
    if name not in field_names() or name in NOT_SEARCHABLE:
        close = difflib.get_close_matches(name, sorted(field_names() - NOT_SEARCHABLE), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        problems.append(f"{where}: not a searchable training setting{hint}")
        return None
    if not isinstance(spec, dict):
        problems.append(f"{where}: expected a mapping like {{type: float, low: 0.0, high: 1.0}}")
        return None
    if unknown := set(spec) - SPEC_KEYS:
        problems.append(f"{where}: unknown keys {sorted(unknown)}; use {sorted(SPEC_KEYS)}")
    kind = spec.get("type")
    if kind not in TYPES:
        problems.append(f"{where}: type {kind!r}; use one of {', '.join(TYPES)}")
        return None
    if name == "tokenizer" and kind != "categorical":
        problems.append(f"{where}: a tokenizer is one of named choices; "
                        "use {type: categorical, choices: [bpe, gpt2]}")
        return None
    param = Param(name, kind, spec.get("low"), spec.get("high"), bool(spec.get("log", False)), spec.get("step"),
                  tuple(spec["choices"]) if isinstance(spec.get("choices"), list) else spec.get("choices"))
    before = len(problems)
    problems.extend(f"{where}: {p}" for p in _range_problems(param))
    return param if len(problems) == before else None


def _range_problems(p: Param) -> list[str]:
    if p.type == "categorical":
        if not isinstance(p.choices, tuple) or not p.choices:
            return ["categorical needs a non-empty list under 'choices'"]
        if p.name == "tokenizer" and not all(isinstance(c, str) and c for c in p.choices):
            return ["choices are tokenizers: bpe (trained on the data), a hub name (gpt2) or a local directory"]
        allowed = TrainConfig.__dataclass_fields__[p.name].metadata.get("choices")     # e.g. optimizer's
        unknown = [c for c in p.choices if allowed and c not in allowed]
        return [f"choices {unknown} are not settings of {p.name}; use some of {', '.join(allowed)}"] if unknown else []
    numbers = (int, float)
    if not (isinstance(p.low, numbers) and isinstance(p.high, numbers)):
        return [f"needs numeric 'low' and 'high' (got {p.low!r}, {p.high!r})"]
    problems = []
    if p.low > p.high or (p.low == p.high and p.type == "float"):
        problems.append(f"empty range: low {p.low} is not below high {p.high}")
    if p.log and p.low <= 0:
        problems.append(f"log scale needs low > 0 (got {p.low})")
    if p.log and p.step is not None:
        problems.append("log scale and step cannot be combined")
    if p.step is not None and not (isinstance(p.step, numbers) and p.step > 0):
        problems.append(f"step must be a positive number (got {p.step!r})")
    return problems


def space_problems(space: list[Param], sampler: str) -> list[str]:
    """Problems of a whole space for a sampler: grid search needs finite value lists."""
    if sampler != "grid":
        return []
    return [f"--sampler grid: parameter {p.name!r} is a float range without 'step'; add a step or use choices"
            for p in space if p.type == "float" and p.step is None]


def vocabulary_problems(space: list[Param], base: TrainConfig) -> list[str]:
    """A searched vocab_size that no trial would use: it sizes the BPE that --tokenizer bpe trains,
    and a pretrained tokenizer has its own vocabulary."""
    names = {p.name: p for p in space}
    tokenizers = names["tokenizer"].choices if "tokenizer" in names else (base.tokenizer,)
    if "vocab_size" not in names or "bpe" in tokenizers:
        return []
    return [f"--space: parameter 'vocab_size' sizes the BPE tokenizer trained on the data, and every trial uses "
            f"the pretrained tokenizer {', '.join(map(str, tokenizers))}; set tokenizer: bpe in --config, or search "
            "tokenizer with bpe among its choices, or drop vocab_size from the space"]


def data_settings(cfg: TrainConfig) -> tuple[Any, ...]:
    """What a trial's prepared data depends on among the searchable settings (DATA_FIELDS)."""
    return tuple(getattr(cfg, name) for name in DATA_FIELDS)


def grid_space(space: list[Param]) -> dict[str, list[Any]]:
    return {p.name: p.grid_values() for p in space}

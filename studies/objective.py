"""What a study minimises: validation loss (nats per token) or bits per byte of the text.

A loss in nats per token depends on how much text a token holds, so trials with different
tokenizers or vocabulary sizes cannot be ranked by it; bits per byte (trainer.data.text_measure)
can. A study whose space touches the vocabulary therefore minimises ``val_bpb`` by default
and refuses ``val_loss``; any other study keeps ``val_loss``, as studies always did.

The choice is kept with the study (an Optuna study user attribute), so that a session that
continues or joins it cannot switch objectives and mix values of two measures.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

from trainer.errors import ConfigError

OBJECTIVES = ("val_bpb", "val_loss")
VOCABULARY = ("tokenizer", "vocab_size")     # the settings that change what a token is
OBJECTIVE_ATTR = "objective"                 # the study's user attribute that keeps the choice
LEGACY = "val_loss"                          # what a study recorded before there was a choice
LABELS = {"val_loss": "val loss", "val_bpb": "val bpb"}
UNITS = {"val_loss": "best validation loss (nats)", "val_bpb": "best validation bits per byte"}


def vocabulary_params(names: Iterable[str]) -> list[str]:
    """The searched settings (of ``names``) that change the vocabulary."""
    return [n for n in names if n in VOCABULARY]


def choose_objective(requested: str | None, space_names: Iterable[str]) -> str:
    """``requested`` (--objective), or the default for the space; ConfigError where it is refused."""
    if problems := objective_problems(requested, space_names):
        raise ConfigError(problems)
    return requested or ("val_bpb" if vocabulary_params(space_names) else "val_loss")


def objective_problems(requested: str | None, space_names: Iterable[str]) -> list[str]:
    """val_loss asked of a space whose trials' losses are per tokens of different vocabularies."""
    vocabulary = vocabulary_params(space_names)
    if requested != "val_loss" or not vocabulary:
        return []
    return [f"--objective val_loss: the space searches {', '.join(vocabulary)}, and losses per token of "
            "different vocabularies are not comparable (a token holds more or less text); use --objective "
            "val_bpb (the default for such a space)"]


def recorded_objective(user_attrs: dict[str, Any], has_trials: bool) -> str | None:
    """The objective a study was run with: its attribute, or val_loss for a study with trials
    from before the attribute existed; None for a new study."""
    return user_attrs.get(OBJECTIVE_ATTR) or (LEGACY if has_trials else None)


def mismatch_problem(study_name: str, recorded: str | None, objective: str) -> str | None:
    """Why the study cannot continue with ``objective``, or None."""
    if recorded is None or recorded == objective:
        return None
    return (f"--study-name {study_name!r}: the study minimises {recorded}, and this command would minimise "
            f"{objective} (--objective, or its default for the space), mixing two measures in one study; "
            f"pass --objective {recorded} with a space it fits, or start a new study with another --study-name")


def stored_objective(storage_url: str, study_name: str) -> str | None:
    """The recorded objective of ``study_name`` in an existing storage, read with plain SQL
    (opening an Optuna storage creates its tables: a write, and nothing is written before the
    checks pass); None where there is no such study yet, or the storage cannot be read."""
    import json

    import expdb
    from sqlalchemy import create_engine, text

    try:
        if study_name not in expdb.study_names(storage_url):
            return None
    except expdb.ExpdbError:            # reported by the storage's own check
        return None
    engine = create_engine(storage_url)
    try:
        with engine.connect() as conn:
            study_id = conn.execute(text("SELECT study_id FROM studies WHERE study_name = :n"),
                                    {"n": study_name}).scalar()
            attr = conn.execute(text("SELECT value_json FROM study_user_attributes WHERE study_id = :s "
                                     "AND key = :k"), {"s": study_id, "k": OBJECTIVE_ATTR}).scalar()
            trials = conn.execute(text("SELECT COUNT(*) FROM trials WHERE study_id = :s"), {"s": study_id}).scalar()
    finally:
        engine.dispose()
    return recorded_objective({OBJECTIVE_ATTR: json.loads(attr)} if attr else {}, bool(trials))


def objective_value(result: Any, objective: str) -> float:
    """The trial's value from its trainer RunResult: best_val_bpb is the bpb at the best val loss's
    step (NaN when never measured, told to Optuna as a non-finite loss is: a failed trial)."""
    value = getattr(result, f"best_{objective}", math.nan)
    return math.nan if value is None else float(value)

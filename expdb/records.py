"""Frozen records handed to callers instead of ORM rows (after optuna's FrozenTrial)."""
from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, Mapping

from expdb.values import from_json

_JSON_FIELDS = ("config", "dataset", "tokenizer")


@dataclass(frozen=True)
class RunRecord:
    """One row of ``runs``, with its JSON columns parsed into dicts."""

    id: int
    uid: str                        # names the run across databases (see merge)
    name: str
    status: str
    status_reason: str | None
    study_name: str | None
    trial_number: int | None
    config: dict[str, Any]
    dataset: dict[str, Any]
    tokenizer: dict[str, Any]
    n_params: int | None
    device: str | None
    precision: str | None
    host: str | None
    out_dir: str | None
    started_at: datetime
    ended_at: datetime | None
    updated_at: datetime
    resume_count: int
    best_val_loss: float | None
    best_step: int | None
    best_val_bpb: float | None = None   # val_bpb at best_step (None before schema version 4)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "RunRecord":
        values = {f.name: row[f.name] for f in fields(cls)}
        for name in _JSON_FIELDS:
            values[name] = from_json(values[name])
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

"""Rows as plain tuples, and the one SQL statement that writes each kind.

The writer hands the driver lists of tuples through ``exec_driver_sql`` (a bare DBAPI
executemany): building dicts and letting SQLAlchemy process every parameter costs
three times as much as the insert itself. A ``RowSpec`` fixes a table's column order,
turns the trainer's metric dicts into tuples (with the NaN convention of
docs/schema.md) and renders the INSERT, or the upsert where a row has a natural key
("a step logged again replaces the earlier row").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from expdb.models import FLOAT_COLUMNS, Checkpoint, EpochMetric, EvalMetric, Event, StepMetric

_PLACEHOLDER = {"qmark": "?", "numeric": "?", "format": "%s", "pyformat": "%s"}


@dataclass(frozen=True)
class RowSpec:
    table: str
    fixed: tuple[str, ...]              # columns passed by the caller, in this order
    floats: tuple[str, ...] = ()        # metric columns taken from the metrics dict
    key: tuple[str, ...] = ()           # natural key: a repeated key replaces the row
    _sql: dict[str, str] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def columns(self) -> tuple[str, ...]:
        return self.fixed + self.floats + (("nan_columns",) if self.floats else ())

    def encode(self, fixed: tuple, metrics: Mapping[str, Any]) -> tuple:
        """``fixed`` values, then each float column's value: None when absent, and NaN
        stored as None plus the column's name in ``nan_columns``."""
        if not self.floats:
            return fixed
        get = metrics.get
        values = [None if (v := get(c)) is None else float(v) for c in self.floats]
        nan = [c for c, v in zip(self.floats, values) if v != v]    # only NaN differs from itself
        if not nan:
            return (*fixed, *values, None)
        return (*fixed, *[None if v != v else v for v in values], ",".join(nan))

    def sql(self, paramstyle: str) -> str:
        """INSERT (or, with a natural key, an upsert) for a DBAPI executemany of tuples."""
        text = self._sql.get(paramstyle)
        if text is None:
            mark = _PLACEHOLDER[paramstyle]
            text = (f"INSERT INTO {self.table} ({', '.join(self.columns)}) "
                    f"VALUES ({', '.join([mark] * len(self.columns))})")
            if self.key:
                others = [c for c in self.columns if c not in self.key]
                text += (f" ON CONFLICT ({', '.join(self.key)}) DO UPDATE SET "
                         + ", ".join(f"{c} = excluded.{c}" for c in others))
            self._sql[paramstyle] = text
        return text


STEP = RowSpec("step_metrics", ("run_id", "step", "epoch", "tokens_seen"), FLOAT_COLUMNS[StepMetric],
               key=("run_id", "step"))
EVAL = RowSpec("eval_metrics", ("run_id", "step", "epoch"), FLOAT_COLUMNS[EvalMetric], key=("run_id", "step"))
EPOCH = RowSpec("epoch_metrics", ("run_id", "epoch", "step", "recorded_at"), FLOAT_COLUMNS[EpochMetric],
                key=("run_id", "epoch"))
CHECKPOINT = RowSpec("checkpoints", ("run_id", "path", "kind", "step", "size_bytes", "sha256", "created_at",
                                     "deleted"), FLOAT_COLUMNS[Checkpoint])
EVENT = RowSpec("events", ("run_id", "kind", "step", "detail", "created_at"))

# Where the columns of each spec come from must match the tables exactly.
for _spec, _model in ((STEP, StepMetric), (EVAL, EvalMetric), (EPOCH, EpochMetric),
                      (CHECKPOINT, Checkpoint), (EVENT, Event)):
    assert set(_spec.columns) == {c.name for c in _model.__table__.columns} - {"id"}, _spec.table

# Positions in a STEP tuple, for the rollup fold.
STEP_INDEX = {name: i for i, name in enumerate(STEP.columns)}
assert STEP.columns == ("run_id", "step", "epoch", "tokens_seen", "loss", "lr", "grad_norm", "tokens_per_s",
                        "nan_columns"), "encode_step below spells out this order"


def encode_step(run_id: int, step: int, metrics: Mapping[str, Any], _float=float, _int=int) -> tuple:
    """STEP.encode, unrolled for the usual case (all four float metrics reported, none NaN):
    it runs once per optimizer step, and a million times a second in the benchmark."""
    get = metrics.get
    try:
        loss, lr = _float(get("loss")), _float(get("lr"))
        grad_norm, tps = _float(get("grad_norm")), _float(get("tokens_per_s"))
    except TypeError:                   # a metric not reported (None): the general path
        return _encode_step_general(run_id, step, metrics)
    if loss != loss or lr != lr or grad_norm != grad_norm or tps != tps:    # NaN is not equal to itself
        return _encode_step_general(run_id, step, metrics)
    epoch, seen = get("epoch"), get("tokens_seen")
    return (run_id, _int(step), epoch if epoch is None else _int(epoch), seen if seen is None else _int(seen),
            loss, lr, grad_norm, tps, None)


def _encode_step_general(run_id: int, step: int, metrics: Mapping[str, Any]) -> tuple:
    epoch, seen = metrics.get("epoch"), metrics.get("tokens_seen")
    return STEP.encode((run_id, int(step), None if epoch is None else int(epoch),
                        None if seen is None else int(seen)), metrics)

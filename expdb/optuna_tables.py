"""Optuna's tables beside ours: read a database's studies, copy trials into another one.

Optuna keeps its study in the same file or server as the experiment database (its
tables: studies, trials, trial_params, ..., alembic_version). ``merge`` copies them
with Core statements on tables reflected from each side, so the column types are the
destination's own (PostgreSQL enums included) and no Optuna import is needed to read.

A trial copied by a merge carries the system attribute ``expdb:origin`` naming the
trial it came from ("<study>#<number>@<datetime_start>"), so merging the same source
again recognises it even though its number changed; a trial that was never merged is
named by the same formula from its own fields.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, MetaData, Table, delete, func, insert, inspect, select, update

RUN_ID_ATTR = "run_id"              # the trial -> run link (set by studies.objective)
ORIGIN_ATTR = "expdb:origin"
_STUDY_CHILDREN = ("study_directions", "study_user_attributes", "study_system_attributes")
_TRIAL_CHILDREN = ("trial_params", "trial_values", "trial_intermediate_values", "trial_user_attributes",
                   "trial_system_attributes")
_TABLES = ("studies", "trials", "alembic_version") + _STUDY_CHILDREN + _TRIAL_CHILDREN


@dataclass
class Trial:
    trial_id: int
    number: int
    state: str
    datetime_complete: Any
    origin: str
    run_id: int | None              # the run this trial trained (its "run_id" user attribute)


@dataclass
class Study:
    study_id: int
    name: str
    directions: tuple[str, ...]
    trials: list[Trial] = field(default_factory=list)


class OptunaTables:
    """The Optuna tables of one database, reflected on one connection."""

    def __init__(self, conn: Connection, tables: dict[str, Table]):
        self.conn, self.t = conn, tables

    @classmethod
    def reflect(cls, conn: Connection) -> "OptunaTables | None":
        names = set(inspect(conn).get_table_names())
        if not {"studies", "trials", "alembic_version"} <= names:
            return None
        meta = MetaData()
        meta.reflect(conn, only=[n for n in _TABLES if n in names])
        return cls(conn, dict(meta.tables))

    def version(self) -> str | None:
        return self.conn.execute(select(self.t["alembic_version"].c.version_num)).scalar()

    def studies(self) -> dict[str, Study]:
        t, out = self.t, {}
        for study_id, name in self.conn.execute(select(t["studies"].c.study_id, t["studies"].c.study_name)):
            d = t["study_directions"]
            directions = tuple(str(getattr(r, "name", r)) for r, in self.conn.execute(
                select(d.c.direction).where(d.c.study_id == study_id).order_by(d.c.objective)))
            out[name] = Study(study_id, name, directions, self._trials(study_id, name))
        return out

    def _trials(self, study_id: int, study_name: str) -> list[Trial]:
        t = self.t
        trials = t["trials"]
        attrs = self._attrs(study_id)
        rows = self.conn.execute(select(trials).where(trials.c.study_id == study_id).order_by(trials.c.number))
        out = []
        for r in rows:
            user, system = attrs.get(r.trial_id, ({}, {}))
            origin = system.get(ORIGIN_ATTR) or f"{study_name}#{r.number}@{_iso(r.datetime_start)}"
            run_id = user.get(RUN_ID_ATTR)
            out.append(Trial(r.trial_id, r.number, _state(r.state), r.datetime_complete, origin,
                             int(run_id) if isinstance(run_id, (int, float)) else None))
        return out

    def _attrs(self, study_id: int) -> dict[int, tuple[dict, dict]]:
        t, out = self.t, {}
        for index, name in enumerate(("trial_user_attributes", "trial_system_attributes")):
            a = t[name]
            rows = self.conn.execute(select(a.c.trial_id, a.c.key, a.c.value_json).join(
                t["trials"], t["trials"].c.trial_id == a.c.trial_id).where(t["trials"].c.study_id == study_id))
            for trial_id, key, value in rows:
                out.setdefault(trial_id, ({}, {}))[index][key] = json.loads(value)
        return out

    # -- writing (self is the destination) ------------------------------------------------
    def create_study(self, source: "OptunaTables", study: Study) -> int:
        studies = self.t["studies"]
        study_id = self.conn.execute(insert(studies).values(study_name=study.name)
                                     .returning(studies.c.study_id)).scalar_one()
        for name in _STUDY_CHILDREN:
            self._copy_children(source, name, "study_id", study.study_id, study_id)
        return study_id

    def next_number(self, study_id: int) -> int:
        """Optuna numbers a trial by counting the study's earlier trials: so do we."""
        trials = self.t["trials"]
        return self.conn.execute(select(func.count()).where(trials.c.study_id == study_id)).scalar_one()

    def copy_trial(self, source: "OptunaTables", trial: Trial, study_id: int, number: int,
                   run_ids: dict[int, int]) -> int:
        src, dst = source.t["trials"], self.t["trials"]
        row = source.conn.execute(select(src).where(src.c.trial_id == trial.trial_id)).mappings().one()
        values = {c: row[c] for c in dst.c.keys() if c in row and c != "trial_id"}
        values.update(study_id=study_id, number=number)
        trial_id = self.conn.execute(insert(dst).values(**values).returning(dst.c.trial_id)).scalar_one()
        self._copy_trial_children(source, trial, trial_id, run_ids)
        return trial_id

    def replace_trial(self, source: "OptunaTables", trial: Trial, trial_id: int, run_ids: dict[int, int]) -> None:
        """Overwrite a copied trial with a later state of it (e.g. finished in a later session)."""
        src, dst = source.t["trials"], self.t["trials"]
        row = source.conn.execute(select(src).where(src.c.trial_id == trial.trial_id)).mappings().one()
        self.conn.execute(update(dst).where(dst.c.trial_id == trial_id).values(
            state=row["state"], datetime_complete=row["datetime_complete"]))
        for name in _TRIAL_CHILDREN:
            self.conn.execute(delete(self.t[name]).where(self.t[name].c.trial_id == trial_id))
        self._copy_trial_children(source, trial, trial_id, run_ids)

    def _copy_trial_children(self, source: "OptunaTables", trial: Trial, trial_id: int,
                             run_ids: dict[int, int]) -> None:
        def relink(values: dict) -> dict:
            if values.get("key") == RUN_ID_ATTR and trial.run_id in run_ids:
                values["value_json"] = json.dumps(run_ids[trial.run_id])
            return values

        for name in _TRIAL_CHILDREN:
            self._copy_children(source, name, "trial_id", trial.trial_id, trial_id,
                                relink if name == "trial_user_attributes" else None)
        system = self.t["trial_system_attributes"]
        if not self.conn.execute(select(system.c.key).where(system.c.trial_id == trial_id,
                                                            system.c.key == ORIGIN_ATTR)).first():
            self.conn.execute(insert(system).values(trial_id=trial_id, key=ORIGIN_ATTR,
                                                    value_json=json.dumps(trial.origin)))

    def _copy_children(self, source: "OptunaTables", name: str, parent: str, old: int, new: int,
                       change=None) -> None:
        src, dst = source.t[name], self.t[name]
        own_key = dst.primary_key.columns.keys()
        rows = []
        for row in source.conn.execute(select(src).where(src.c[parent] == old)).mappings():
            values = {c: row[c] for c in dst.c.keys() if c in row and c not in own_key}
            values[parent] = new
            rows.append(change(values) if change else values)
        if rows:
            self.conn.execute(insert(dst), rows)


def _state(value: Any) -> str:
    return str(getattr(value, "name", value))


def _iso(value: Any) -> str:
    return value.isoformat() if hasattr(value, "isoformat") else str(value)

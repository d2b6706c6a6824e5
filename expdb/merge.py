"""Merge experiment databases: runs of several sessions (Kaggle, Colab, laptops) in one.

Runs get new ids in the destination and keep everything else; they are recognised by
``runs.uid``, so merging a source twice adds nothing. A run already present is
replaced by the source's copy only when that copy is newer (a later ``updated_at``:
the run was resumed and went on in a later session), otherwise left alone.

Optuna studies in the source's own tables come along: a study that the destination
lacks is created; one it has (same name and directions) receives the source's trials,
numbered after its own, as two sessions of one search. Each trial's ``run_id`` user
attribute and each run's ``trial_number`` are rewritten to the new ids and numbers. A
study of the same name but other directions cannot be merged: nothing is written and
MergeError says so. Each source is merged in one transaction: all of it or nothing, so a
merge killed at any moment leaves the destination as it was before that source (a new
destination may be left with its empty tables), and running it again completes it.

Paths stored relative to the source's folder (checkpoints, run folders: expdb.paths) are
stored again relative to the destination's, or absolute where they lie outside it, so
they still name the source's files (a read-only input of a later session, say).
"""
from __future__ import annotations

import os
import sqlite3
import tempfile
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from sqlalchemy import Connection, delete, insert, select, update

from expdb import paths, reads
from expdb._write.rows import EVAL, STEP, RowSpec
from expdb.db import ExperimentDB
from expdb.engine import locate, normalize_url, readonly_uri, translated
from expdb.errors import MergeError
from expdb.models import SCHEMA_VERSION, Checkpoint, EpochMetric, EvalMetric, Event, Run, StepMetric, StepRollup
from expdb.optuna_tables import OptunaTables, Study, Trial
from expdb.values import to_json, utcnow
from trainer.files import pause_point

_RAW_TABLES = (RowSpec("step_metrics", STEP.columns), RowSpec("eval_metrics", EVAL.columns),
               RowSpec("step_rollups", tuple(c.name for c in StepRollup.__table__.c)))
_CORE_TABLES = (EpochMetric, Checkpoint, Event)     # datetimes and booleans: let SQLAlchemy convert
_HISTORY = tuple(m.__table__ for m in (StepMetric, EvalMetric, StepRollup, *_CORE_TABLES))
_FETCH = 20_000


@dataclass
class MergeReport:
    source: str
    runs_added: list[int] = field(default_factory=list)      # destination ids
    runs_updated: list[int] = field(default_factory=list)
    runs_skipped: int = 0
    studies_added: list[str] = field(default_factory=list)
    trials_added: int = 0
    trials_updated: int = 0
    added_trials: list[tuple[str, int]] = field(default_factory=list)   # (study, destination number)

    def summary(self) -> str:
        return (f"{self.source}: {len(self.runs_added)} runs added, {len(self.runs_updated)} updated, "
                f"{self.runs_skipped} already present; {self.trials_added} trials added, "
                f"{self.trials_updated} updated"
                + (f"; new studies: {', '.join(self.studies_added)}" if self.studies_added else ""))


def merge(sources: Iterable[str | os.PathLike], into: str | os.PathLike) -> list[MergeReport]:
    """Merge each source into ``into`` (created if missing), one transaction per source.
    Every source is opened (and so checked) before the destination is touched."""
    with ExitStack() as stack:
        target = normalize_url(into)
        opened = [stack.enter_context(_open_source(source, target)) for source in sources]
        dst = stack.enter_context(ExperimentDB(into))
        dst.require_writable("merge into it")
        return [_merge_one(src, dst) for src in opened]


@contextmanager
def _open_source(source: str | os.PathLike, target: str) -> Iterator[ExperimentDB]:
    location = locate(source, create=False, readonly=True)
    if location.url == target:
        raise MergeError(f"{location.where} is the destination itself; pass another source")
    if location.sqlite and (_sqlite_version(location.where) or SCHEMA_VERSION) < SCHEMA_VERSION:
        # An older schema: upgrade a private copy, never the source.
        with tempfile.TemporaryDirectory(prefix="expdb-merge-") as tmp:
            copy = Path(tmp) / Path(location.where).name
            _sqlite_copy(location.where, copy)
            with ExperimentDB(copy) as src:
                src.where = location.where      # messages and "merged" events name the source
                yield src
        return
    with ExperimentDB(source, create=False, readonly=True) as src:
        yield src


def _sqlite_version(path: str) -> int | None:
    conn = sqlite3.connect(readonly_uri(path), uri=True)
    try:
        if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'expdb_schema_version'").fetchone():
            return conn.execute("SELECT version FROM expdb_schema_version ORDER BY id DESC").fetchone()[0]
        return None
    finally:
        conn.close()


def _sqlite_copy(path: str, copy: Path) -> None:
    source = sqlite3.connect(readonly_uri(path), uri=True)
    target = sqlite3.connect(copy)
    try:
        source.backup(target)       # a consistent snapshot, even of a file being written
    finally:
        target.close()
        source.close()


def _merge_one(src: ExperimentDB, dst: ExperimentDB) -> MergeReport:
    report = MergeReport(src.where)
    with translated(src.where), src._reader.connect() as s_conn:
        s_runs = [dict(r) for r in s_conn.execute(select(Run.__table__).order_by(Run.id)).mappings()]
        s_optuna = OptunaTables.reflect(s_conn)
        s_studies = s_optuna.studies() if s_optuna else {}
        if s_studies:
            _ensure_optuna_schema(dst)
        with translated(dst.where), dst._writer.connect() as d_conn, d_conn.begin():
            d_optuna = OptunaTables.reflect(d_conn) if s_studies else None
            d_studies = d_optuna.studies() if d_optuna else {}
            _check_studies(src, dst, s_optuna, s_studies, d_optuna, d_studies)
            plan = _Plan(s_runs, d_conn)
            for run in s_runs:
                _copy_run(src, s_conn, d_conn, run, plan, (src.root, dst.root))
                pause_point("merge.run_copied")     # kill tests: mid-transaction, nothing committed
            for name, study in s_studies.items():
                _merge_study(s_optuna, d_optuna, study, d_studies.get(name), plan, report)
            plan.number_unlinked_runs(d_conn, d_optuna)
            plan.apply_trial_numbers(d_conn)
            plan.report(report)
    return report


class _Plan:
    """Which source runs to add, replace or skip; their destination ids and trial numbers."""

    def __init__(self, s_runs: list[dict], d_conn: Connection):
        runs = Run.__table__
        self.runs = {r["id"]: r for r in s_runs}
        self.existing = {r.uid: r for r in d_conn.execute(select(runs.c.id, runs.c.uid, runs.c.updated_at,
                                                                 runs.c.study_name, runs.c.trial_number))}
        self.action: dict[int, str] = {}
        self.ids: dict[int, int] = {}           # source run id -> destination run id
        for run in s_runs:
            found = self.existing.get(run["uid"])
            if found is None:
                self.action[run["id"]] = "add"
            else:
                self.action[run["id"]] = "update" if run["updated_at"] > found.updated_at else "skip"
                self.ids[run["id"]] = found.id
        self.numbers: dict[int, int | None] = {}     # added run (destination id) -> trial number

    def added_in_trial(self, study_name: str, trial: Trial) -> list[int]:
        """Source ids of the added runs that ``trial`` trained: by its run_id attribute,
        else by the run's (study_name, trial_number)."""
        return [sid for sid, run in self.runs.items() if self.action[sid] == "add" and (
            sid == trial.run_id if trial.run_id is not None
            else (run["study_name"], run["trial_number"]) == (study_name, trial.number))]

    def number_unlinked_runs(self, d_conn: Connection, d_optuna: OptunaTables | None) -> None:
        """Added runs of a study that no Optuna trial claimed keep their trial number when it
        is free in the destination, else take the next free one."""
        runs = Run.__table__
        taken = {(r.study_name, r.trial_number) for r in d_conn.execute(
            select(runs.c.study_name, runs.c.trial_number).where(runs.c.trial_number.is_not(None)))}
        taken |= {(self.runs[s]["study_name"], n) for s, n in self._assigned().items()}
        if d_optuna is not None:       # a trial's number belongs to that trial's run
            taken |= {(name, t.number) for name, study in d_optuna.studies().items() for t in study.trials}
        for sid in [s for s, a in self.action.items() if a == "add" and self.ids[s] not in self.numbers]:
            study, number = self.runs[sid]["study_name"], self.runs[sid]["trial_number"]
            if study is not None and number is not None and (study, number) in taken:
                number = 1 + max(n for s, n in taken if s == study)
            self.numbers[self.ids[sid]] = number
            taken.add((study, number))

    def _assigned(self) -> dict[int, int]:
        by_dst = {d: s for s, d in self.ids.items()}
        return {by_dst[d]: n for d, n in self.numbers.items() if n is not None}

    def apply_trial_numbers(self, d_conn: Connection) -> None:
        runs = Run.__table__
        for run_id, number in self.numbers.items():
            if number is not None:
                d_conn.execute(update(runs).where(runs.c.id == run_id).values(trial_number=number))

    def report(self, report: MergeReport) -> None:
        report.runs_added = [self.ids[s] for s, a in self.action.items() if a == "add"]
        report.runs_updated = [self.ids[s] for s, a in self.action.items() if a == "update"]
        report.runs_skipped = sum(a == "skip" for a in self.action.values())


def _check_studies(src, dst, s_optuna, s_studies, d_optuna, d_studies) -> None:
    if not s_studies:
        return
    if d_optuna is not None and d_optuna.version() != s_optuna.version():
        raise MergeError(
            f"the Optuna tables of {src.where} (version {s_optuna.version()}) and {dst.where} (version "
            f"{d_optuna.version()}) differ; nothing was merged. Upgrade the older one first: "
            "optuna storage upgrade --storage URL")
    clashes = [f"{name!r} ({'/'.join(study.directions)} here, {'/'.join(d_studies[name].directions)} "
               "in the destination)" for name, study in s_studies.items()
               if name in d_studies and d_studies[name].directions != study.directions]
    if clashes:
        raise MergeError(f"{src.where}: studies with the name of a destination study but other "
                         f"directions: {'; '.join(clashes)}. Nothing was merged. Rename one of them "
                         "(optuna.copy_study to a new name) and merge again")


def _ensure_optuna_schema(dst: ExperimentDB) -> None:
    with dst._reader.connect() as conn:
        if OptunaTables.reflect(conn) is not None:
            return
    import optuna   # only to create Optuna's own schema in a destination that has none

    optuna.storages.RDBStorage(dst._location.connect_url).engine.dispose()


def _copy_run(src: ExperimentDB, s_conn: Connection, d_conn: Connection, run: dict, plan: _Plan,
              roots: tuple[Path | None, Path | None]) -> None:
    action, runs = plan.action[run["id"]], Run.__table__
    if action == "skip":
        return
    values = {k: v for k, v in run.items() if k != "id"}
    values["out_dir"] = paths.rebase(values.get("out_dir"), *roots)     # stored again from our folder
    if action == "add":
        # Its trial number is set once the studies are merged (it may change, and may clash meanwhile).
        new_id = d_conn.execute(insert(runs).values(**{**values, "trial_number": None})
                                .returning(runs.c.id)).scalar_one()
        plan.ids[run["id"]] = new_id
    else:       # a newer copy of a run we have: its history replaces ours, its study link stays ours
        new_id = plan.ids[run["id"]]
        kept = plan.existing[run["uid"]]
        d_conn.execute(update(runs).where(runs.c.id == new_id).values(
            **{**values, "study_name": kept.study_name, "trial_number": kept.trial_number}))
        for table in _HISTORY:
            d_conn.execute(delete(table).where(table.c.run_id == new_id))
    _copy_history(src, s_conn, d_conn, run["id"], new_id, roots)
    d_conn.execute(insert(Event.__table__).values(
        run_id=new_id, kind="merged", step=None, created_at=utcnow(),
        detail=to_json({"source": src.where, "source_run_id": run["id"], "action": action})))


def _copy_history(src: ExperimentDB, s_conn: Connection, d_conn: Connection, old_id: int, new_id: int,
                  paths_from: tuple[Path | None, Path | None]) -> None:
    paramstyle = d_conn.dialect.paramstyle
    with reads.raw_cursor(src._reader, src.where) as cur:
        for spec in _RAW_TABLES:        # big tables: plain tuples, in key order, a chunk at a time
            columns, key = spec.columns, spec.columns[1]
            sql = (f"SELECT {', '.join(columns)} FROM {spec.table} WHERE run_id = ? AND {key} > ? "
                   f"ORDER BY {key} LIMIT {_FETCH}")
            last = -2 ** 62
            while rows := cur.all(sql, (old_id, last)):
                d_conn.exec_driver_sql(spec.sql(paramstyle), [(new_id, *r[1:]) for r in rows])
                last = rows[-1][1]
    for model in _CORE_TABLES:
        table = model.__table__
        rows = [{**r, "run_id": new_id} for r in s_conn.execute(
            select(*[c for c in table.c if c.name != "id"]).where(table.c.run_id == old_id)
            .order_by(table.c.id)).mappings()]
        if model is Checkpoint:
            rows = [{**r, "path": paths.rebase(r["path"], *paths_from)} for r in rows]
        if rows:
            d_conn.execute(insert(table), rows)


def _merge_study(s_optuna: OptunaTables, d_optuna: OptunaTables, study: Study, mine: Study | None,
                 plan: _Plan, report: MergeReport) -> None:
    if mine is None:
        study_id, known = d_optuna.create_study(s_optuna, study), {}
        report.studies_added.append(study.name)
    else:
        study_id, known = mine.study_id, {t.origin: t for t in mine.trials}
    for trial in study.trials:
        number = _merge_trial(s_optuna, d_optuna, trial, known.get(trial.origin), (study.name, study_id), plan,
                              report)
        for sid in plan.added_in_trial(study.name, trial):
            plan.numbers[plan.ids[sid]] = number


def _merge_trial(s_optuna: OptunaTables, d_optuna: OptunaTables, trial: Trial, mine: Trial | None,
                 study: tuple[str, int], plan: _Plan, report: MergeReport) -> int:
    study_name, study_id = study
    if mine is None:
        number = d_optuna.next_number(study_id)
        d_optuna.copy_trial(s_optuna, trial, study_id, number, plan.ids)
        report.trials_added += 1
        report.added_trials.append((study_name, number))
        return number
    finished_since = trial.datetime_complete is not None and mine.datetime_complete is None
    if finished_since or plan.action.get(trial.run_id) == "update":     # went on in a later session
        d_optuna.replace_trial(s_optuna, trial, mine.trial_id, plan.ids)
        report.trials_updated += 1
    return mine.number

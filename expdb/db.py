"""ExperimentDB: open a database, hand out recorders, read runs back as DataFrames.

Reads never lock out a running training (SQLite runs in WAL mode, reads are deferred
transactions); every read returns a DataFrame or a frozen RunRecord, never ORM rows.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from typing import Any, Iterator

import pandas as pd
from sqlalchemy import Select, column, make_url, select, table
from sqlalchemy.orm import Session, sessionmaker

from expdb import runs as run_rows
from expdb.engine import (DEFAULT_BUSY_TIMEOUT_S, check_sqlite_file, describe, enable_wal,
                          make_engines, normalize_url, session_scope, translated)
from expdb.errors import UnknownRunError
from expdb.models import FLOAT_COLUMNS, Checkpoint, EpochMetric, EvalMetric, Event, Run, StepMetric
from expdb.records import RunRecord
from expdb.recorder import DBRecorder
from expdb.schema import ensure_schema
from expdb.values import from_json

_HIDDEN = ("nan_columns",)      # storage detail: a DataFrame shows NaN itself
_RUN_SUMMARY = table("run_summary", column("id"), column("n_steps"), column("last_step"),
                     column("n_epochs"), column("duration_s"))
_STUDY_COLUMNS = ["trial_number", "run_id", "name", "status", "status_reason", "best_val_loss",
                  "best_step", "n_steps", "n_epochs", "duration_s", "started_at", "ended_at"]


def open(url_or_path: str | os.PathLike = "experiments.db", *, create: bool = True,
         busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S) -> "ExperimentDB":
    """Open (and, for a new SQLite path, create) an experiment database."""
    return ExperimentDB(url_or_path, create=create, busy_timeout_s=busy_timeout_s)


class ExperimentDB:
    """An experiment database: a SQLite file path or a SQLAlchemy URL.

    ``create=False`` refuses a SQLite path that does not exist (for readers such as the
    CLI). ``busy_timeout_s`` is how long a SQLite write waits for another writer's lock.
    """

    def __init__(self, url_or_path: str | os.PathLike = "experiments.db", *, create: bool = True,
                 busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S):
        self.url = normalize_url(url_or_path)
        self.where = describe(self.url)
        sqlite = make_url(self.url).get_backend_name() == "sqlite"
        if sqlite:
            check_sqlite_file(self.url, create)     # before any connection can touch the file
        self._reader, self._writer = make_engines(self.url, busy_timeout_s)
        try:
            with translated(self.where):
                ensure_schema(self._reader, self._writer, self.where)
                if sqlite:
                    enable_wal(self._reader)
        except BaseException:
            self._reader.dispose()
            raise
        self._sessions = sessionmaker(bind=self._writer, expire_on_commit=False)

    def __repr__(self) -> str:
        return f"ExperimentDB({self.where!r})"

    def __enter__(self) -> "ExperimentDB":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Release the connections. Finish the recorders of this database first."""
        self._reader.dispose()

    # -- writing -----------------------------------------------------------------------
    def recorder(self, study_name: str | None = None, trial_number: int | None = None,
                 **options: Any) -> DBRecorder:
        """A trainer.recorder.Recorder writing one run into this database.

        RunInfo.study_name / trial_number, when set, take precedence over these.
        ``options``: flush_interval_s, batch_rows, finish_timeout_s (see DBRecorder).
        """
        return DBRecorder(self, study_name, trial_number, **options)

    def mark_checkpoint_deleted(self, run_id: int, path: str) -> int:
        """Flag a checkpoint file of a run as deleted (the row stays); returns rows changed."""
        with self._write_session() as session:
            return run_rows.mark_checkpoint_deleted(session, run_id, str(path))

    @contextmanager
    def _write_session(self) -> Iterator[Session]:
        with session_scope(self._sessions, self.where) as session:
            yield session

    # -- reading -----------------------------------------------------------------------
    def run(self, run_id: int) -> RunRecord:
        runs = Run.__table__
        with translated(self.where), self._reader.connect() as conn:
            row = conn.execute(select(runs).where(runs.c.id == run_id)).mappings().first()
        if row is None:
            raise UnknownRunError(run_id)
        return RunRecord.from_row(row)

    def runs(self, study_name: str | None = None) -> pd.DataFrame:
        """One row per run: the runs columns (JSON parsed to dicts) plus n_steps, last_step,
        n_epochs and duration_s from the run_summary view; ordered by id."""
        runs = Run.__table__
        stmt = (select(*runs.c, *[c for c in _RUN_SUMMARY.c if c.name != "id"])
                .join_from(runs, _RUN_SUMMARY, runs.c.id == _RUN_SUMMARY.c.id).order_by(runs.c.id))
        if study_name is not None:
            stmt = stmt.where(runs.c.study_name == study_name)
        df = self._frame(stmt, floats=("best_val_loss", "duration_s"))
        for name in ("config", "dataset", "tokenizer"):
            df[name] = [from_json(text) for text in df[name]]
        return df

    def steps(self, run_id: int) -> pd.DataFrame:
        return self._history(StepMetric, run_id, "step")

    def evals(self, run_id: int) -> pd.DataFrame:
        return self._history(EvalMetric, run_id, "step")

    def epochs(self, run_id: int | None = None) -> pd.DataFrame:
        return self._history(EpochMetric, run_id, "epoch")

    def checkpoints(self, run_id: int | None = None) -> pd.DataFrame:
        return self._history(Checkpoint, run_id, "id")

    def events(self, run_id: int | None = None) -> pd.DataFrame:
        df = self._history(Event, run_id, "id")
        df["detail"] = [from_json(text) for text in df["detail"]]
        return df

    def study(self, study_name: str, all_params: bool = False) -> pd.DataFrame:
        """One row per run of a study, by trial_number, with its best validation loss.

        Config values become ``params_<name>`` columns: only those that differ between the
        study's runs (the searched ones), or all of them with ``all_params=True``.
        An unknown study gives an empty frame.
        """
        runs = self.runs(study_name).rename(columns={"id": "run_id"})
        params = pd.DataFrame([{k: _scalar(v) for k, v in cfg.items()} for cfg in runs["config"]],
                              index=runs.index)
        if not all_params and len(params.columns):
            params = params.loc[:, params.nunique(dropna=False) > 1]
        params.columns = [f"params_{name}" for name in params.columns]
        df = pd.concat([runs[_STUDY_COLUMNS], params], axis=1)
        return df.sort_values(["trial_number", "run_id"], ignore_index=True)

    def _history(self, model: type, run_id: int | None, order: str) -> pd.DataFrame:
        table_ = model.__table__
        columns = [c for c in table_.c if c.name not in _HIDDEN and (c.name != "id" or order == "id")]
        stmt = select(*columns)
        if run_id is not None:
            self.run(run_id)        # an unknown id is an error, not an empty frame
            stmt = stmt.where(table_.c.run_id == run_id)
        stmt = stmt.order_by(table_.c.run_id, table_.c[order])
        return self._frame(stmt, floats=FLOAT_COLUMNS.get(model, ()))

    def _frame(self, stmt: Select, floats: tuple[str, ...] = ()) -> pd.DataFrame:
        with translated(self.where), self._reader.connect() as conn:
            df = pd.read_sql(stmt, conn)
        # NULL (NaN or not reported) must read as float NaN even in an all-NULL column.
        for name in floats:
            df[name] = df[name].astype("float64")
        return df


def _scalar(value: Any) -> Any:
    """A config value that a DataFrame can compare: lists and dicts become their JSON text."""
    return json.dumps(value, default=str) if isinstance(value, (list, dict)) else value

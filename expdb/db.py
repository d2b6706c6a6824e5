"""ExperimentDB: open a database, hand out recorders, read runs back as DataFrames.

Reads never lock out a running training (SQLite runs in WAL mode, reads are deferred
transactions); every read returns a DataFrame or a frozen RunRecord, never ORM rows.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import pandas as pd
from sqlalchemy import Select, column, select, table
from sqlalchemy.orm import Session, sessionmaker

from expdb import paths, reads
from expdb._write import runs as run_rows
from expdb._write.recorder import DBRecorder
from expdb.engine import DEFAULT_BUSY_TIMEOUT_S, WriteAccess, enable_wal, locate, make_engines, translated
from expdb.errors import ReadOnlyDatabaseError, UnknownRunError
from expdb.models import FLOAT_COLUMNS, Checkpoint, EpochMetric, EvalMetric, Event, Run
from expdb.records import RunRecord
from expdb.schema import ensure_schema
from expdb.values import from_json

_HIDDEN = ("nan_columns",)      # storage detail: a DataFrame shows NaN itself
_RUN_SUMMARY = table("run_summary", column("id"), column("n_steps"), column("last_step"),
                     column("n_epochs"), column("duration_s"))
_COMPARE_COLUMNS = ["run_id", "name", "status", "status_reason", "study_name", "trial_number", "best_val_loss",
                    "best_val_bpb", "best_step", "n_steps", "n_epochs", "duration_s", "host", "started_at", "ended_at"]
_STUDY_COLUMNS = ["trial_number", "run_id", "name", "status", "status_reason", "best_val_loss",
                  "best_val_bpb", "best_step", "n_steps", "n_epochs", "duration_s", "started_at", "ended_at"]


def open(url_or_path: str | os.PathLike = "experiments.db", *, create: bool = True, readonly: bool = False,
         busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S) -> "ExperimentDB":
    """Open (and, for a new SQLite path, create) an experiment database."""
    return ExperimentDB(url_or_path, create=create, readonly=readonly, busy_timeout_s=busy_timeout_s)


class ExperimentDB:
    """An experiment database: a SQLite file path or a SQLAlchemy URL.

    ``create=False`` refuses a SQLite path that does not exist (for readers such as the
    CLI). ``readonly=True`` never writes (no schema creation, no upgrade, no recorder);
    a SQLite file in a place this process cannot write is opened that way by itself.
    ``busy_timeout_s`` is how long a SQLite write waits for another writer's lock.
    """

    def __init__(self, url_or_path: str | os.PathLike = "experiments.db", *, create: bool = True,
                 readonly: bool = False, busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S):
        self._location = location = locate(url_or_path, create, readonly)
        self.url, self.where, self.readonly = location.url, location.where, location.readonly
        self._reader, self._writer = make_engines(location, busy_timeout_s)
        try:
            with translated(self.where):
                ensure_schema(self._reader, self._writer, location)
                if location.sqlite and not location.readonly:
                    enable_wal(self._reader)
        except BaseException:
            self._reader.dispose()
            raise
        self._write_access = WriteAccess(self._writer, sessionmaker(bind=self._writer, expire_on_commit=False),
                                         self.where)

    def __repr__(self) -> str:
        return f"ExperimentDB({self.where!r}{', readonly' if self.readonly else ''})"

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
        ``options``: flush_interval_s, batch_rows, sync_timeout_s, finish_timeout_s
        (see DBRecorder).
        """
        self.require_writable("record a run")
        return DBRecorder(self._write_access, study_name, trial_number, **options)

    def mark_checkpoint_deleted(self, run_id: int, path: str) -> int:
        """Flag a checkpoint file of a run as deleted (the row stays); returns rows changed.
        ``path`` as stored (see ``checkpoints``), or the file's path now."""
        with self._write_session() as session:
            changed = run_rows.mark_checkpoint_deleted(session, run_id, str(path))
            if not changed and self.root is not None:
                changed = run_rows.mark_checkpoint_deleted(session, run_id, paths.portable(path, self.root))
            return changed

    def add_event(self, run_id: int, kind: str, step: int | None, detail: dict[str, Any]) -> None:
        """An event of a run written from outside it (a study deleting its files, say)."""
        with self._write_session() as session:
            run_rows.add_event(session, run_id, kind, step, detail)

    @property
    def root(self):
        """The folder that stored relative paths start from (expdb.paths): a SQLite file's
        directory; None on a server, whose paths are absolute."""
        return Path(self.where).absolute().parent if self._location.sqlite else None

    def resolve_path(self, stored: str | None):
        """The file a stored checkpoint or run path names now (relative ones: from ``root``)."""
        return paths.resolve(stored, self.root)

    def require_writable(self, action: str) -> None:
        if self.readonly:
            raise ReadOnlyDatabaseError(
                f"cannot {action}: {self.where} is open read-only (its file or directory is not "
                "writable, or readonly=True was passed); nothing was written. Copy it to a "
                "writable directory and open the copy")

    @contextmanager
    def _write_session(self) -> Iterator[Session]:
        self.require_writable("write")
        with self._write_access.session() as session:
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
        df = self._frame(stmt, floats=("best_val_loss", "best_val_bpb", "duration_s"))
        for name in ("config", "dataset", "tokenizer"):
            df[name] = [from_json(text) for text in df[name]]
        return df

    def steps(self, run_id: int) -> pd.DataFrame:
        """Every step of a run: run_id, step, epoch, loss, lr, grad_norm, tokens_per_s, tokens_seen."""
        self.run(run_id)            # an unknown id is an error, not an empty frame
        return reads.steps_frame(self._reader, self.where, run_id)

    def step_series(self, run_id: int, columns: Sequence[str] = ("loss", "lr", "grad_norm"),
                    max_points: int = 2000) -> pd.DataFrame:
        """At most ``max_points`` step rows of a run for plotting, with every bucket's
        minimum and maximum of each column (see expdb.reads): columns ``step`` and
        ``columns``, one row per kept step, ordered by step."""
        self.run(run_id)
        return reads.step_series(self._reader, self.where, run_id, columns, max_points)

    def evals(self, run_id: int | None = None) -> pd.DataFrame:
        return self._history(EvalMetric, run_id, "step")

    def epochs(self, run_id: int | None = None) -> pd.DataFrame:
        return self._history(EpochMetric, run_id, "epoch")

    def checkpoints(self, run_id: int | None = None) -> pd.DataFrame:
        return self._history(Checkpoint, run_id, "id")

    def events(self, run_id: int | None = None) -> pd.DataFrame:
        df = self._history(Event, run_id, "id")
        df["detail"] = [from_json(text) for text in df["detail"]]
        return df

    def studies(self) -> pd.DataFrame:
        """One row per study (the study_summary view): run counts by status, best run."""
        with translated(self.where), self._reader.connect() as conn:
            df = pd.read_sql("SELECT * FROM study_summary ORDER BY study_name", conn)
        for name in ("best_val_loss", "best_val_bpb"):
            df[name] = df[name].astype("float64")
        return df

    def study(self, study_name: str, all_params: bool = False) -> pd.DataFrame:
        """One row per run of a study, by trial_number, with its best validation loss (and
        the bits per byte at that step).

        Config values become ``params_<name>`` columns: only those that differ between the
        study's runs (the searched ones), or all of them with ``all_params=True``.
        An unknown study gives an empty frame.
        """
        runs = self.runs(study_name).rename(columns={"id": "run_id"})
        df = _with_params(runs, _STUDY_COLUMNS, all_params)
        return df.sort_values(["trial_number", "run_id"], ignore_index=True)

    def compare(self, run_ids: Iterable[int], all_params: bool = False) -> pd.DataFrame:
        """Runs side by side, in the order given (from any studies or sessions): their
        outcome and a ``params_<name>`` column for every config value that differs."""
        run_ids = [int(i) for i in run_ids]
        runs = self.runs().rename(columns={"id": "run_id"}).set_index("run_id", drop=False)
        missing = [i for i in run_ids if i not in runs.index]
        if missing:
            raise UnknownRunError(missing[0])
        return _with_params(runs.loc[run_ids].reset_index(drop=True), _COMPARE_COLUMNS, all_params)

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


def _with_params(runs: pd.DataFrame, columns: list[str], all_params: bool) -> pd.DataFrame:
    params = pd.DataFrame([{k: _scalar(v) for k, v in cfg.items()} for cfg in runs["config"]],
                          index=runs.index)
    if not all_params and len(params.columns):
        params = params.loc[:, params.nunique(dropna=False) > 1]
    params.columns = [f"params_{name}" for name in params.columns]
    return pd.concat([runs[columns], params], axis=1)


def _scalar(value: Any) -> Any:
    """A config value that a DataFrame can compare: lists and dicts become their JSON text."""
    return json.dumps(value, default=str) if isinstance(value, (list, dict)) else value

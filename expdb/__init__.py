"""The experiment database: every run, metric, checkpoint and event of the trainer.

    import expdb
    db = expdb.open("experiments.db")     # or a SQLAlchemy URL (postgresql+psycopg://...)
    rec = db.recorder()                   # a trainer.recorder.Recorder
    db.runs(); db.steps(run_id); db.epochs(run_id); db.study("my-study")
    db.step_series(run_id)                # <= 2000 rows for plotting, spikes kept
    expdb.merge(["kaggle-1.db", "kaggle-2.db"], into="all.db")

Tables, views and conventions: docs/schema.md.
"""
from expdb._write.recorder import DBRecorder
from expdb.db import ExperimentDB, open
from expdb.errors import (ConflictError, CorruptDatabaseError, DatabaseLockedError, DatabaseNotFoundError,
                          DuplicateRunError, ExpdbError, InvalidValueError, MergeError, NotADatabaseError,
                          ReadOnlyDatabaseError, RecorderStateError, RunMismatchError, SchemaError, SchemaTooNewError,
                          StorageError, UnknownRunError, WriteError)
from expdb.merge import MergeReport, merge
from expdb.models import SCHEMA_VERSION
from expdb.precheck import check_database, check_storage_file, study_names
from expdb.records import RunRecord

__all__ = [
    "open", "merge", "check_database", "check_storage_file", "study_names", "ExperimentDB", "DBRecorder", "RunRecord", "MergeReport", "SCHEMA_VERSION",
    "ExpdbError", "DatabaseNotFoundError", "CorruptDatabaseError", "NotADatabaseError", "SchemaTooNewError", "SchemaError",
    "UnknownRunError", "RunMismatchError", "DuplicateRunError", "InvalidValueError", "RecorderStateError",
    "StorageError", "DatabaseLockedError", "ConflictError", "WriteError", "ReadOnlyDatabaseError",
    "MergeError",
]

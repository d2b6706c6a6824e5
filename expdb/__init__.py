"""The experiment database: every run, metric, checkpoint and event of the trainer.

    import expdb
    db = expdb.open("experiments.db")     # or a SQLAlchemy URL (postgresql+psycopg://...)
    rec = db.recorder()                   # a trainer.recorder.Recorder
    db.runs(); db.steps(run_id); db.epochs(run_id); db.study("my-study")

Tables, views and conventions: docs/schema.md.
"""
from expdb.db import ExperimentDB, open
from expdb.errors import (ConflictError, CorruptDatabaseError, DatabaseLockedError, DatabaseNotFoundError,
                          DuplicateRunError, ExpdbError, InvalidValueError, NotADatabaseError,
                          RecorderStateError, SchemaError, SchemaTooNewError, StorageError,
                          UnknownRunError, WriteError)
from expdb.models import SCHEMA_VERSION
from expdb.recorder import DBRecorder
from expdb.records import RunRecord

__all__ = [
    "open", "ExperimentDB", "DBRecorder", "RunRecord", "SCHEMA_VERSION",
    "ExpdbError", "DatabaseNotFoundError", "CorruptDatabaseError", "NotADatabaseError", "SchemaTooNewError", "SchemaError",
    "UnknownRunError", "DuplicateRunError", "InvalidValueError", "RecorderStateError",
    "StorageError", "DatabaseLockedError", "ConflictError", "WriteError",
]

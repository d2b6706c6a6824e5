"""The experiment database's exceptions.

Every error expdb raises on purpose derives from ``ExpdbError`` and carries a message
that names what is wrong and how to fix it, so the command line can print it as is.
Driver errors (sqlite3, psycopg) never leave the package raw: the session scope in
``expdb.engine`` turns them into ``StorageError`` subclasses.
"""
from __future__ import annotations


class ExpdbError(Exception):
    """Base class of every error expdb raises on purpose."""


class DatabaseNotFoundError(ExpdbError, FileNotFoundError):
    """A read-only use (the CLI, ``open(..., create=False)``) named a database that does not exist."""


class NotADatabaseError(ExpdbError):
    """The path holds a file that is not a SQLite database; it was left untouched."""


class CorruptDatabaseError(ExpdbError):
    """The SQLite file is a database, but damaged."""


class ReadOnlyDatabaseError(ExpdbError, PermissionError):
    """The database is in a place this process cannot write; nothing was written."""


class MergeError(ExpdbError):
    """A merge was refused before anything was written (e.g. two studies that cannot be combined)."""


class SchemaTooNewError(ExpdbError):
    """The database was written by a newer expdb; this one refuses to touch it."""


class SchemaError(ExpdbError):
    """The database's schema is not one this expdb can use or upgrade."""


class UnknownRunError(ExpdbError, LookupError):
    """No run has this id."""

    def __init__(self, run_id: object):
        self.run_id = run_id
        super().__init__(f"no run with id {run_id!r} in this experiment database "
                         "(list the runs with `python -m expdb --db URL runs`)")


class RunMismatchError(UnknownRunError):
    """A resume named a run id that, in this database, belongs to another run (ids are per
    database: a checkpoint taken against one file, resumed against a merged one)."""

    def __init__(self, run_id: object, message: str):
        self.run_id = run_id
        ExpdbError.__init__(self, message)


class DuplicateRunError(ExpdbError):
    """A run already holds this (study_name, trial_number)."""


class InvalidValueError(ExpdbError, ValueError):
    """A caller passed a value the schema does not allow (e.g. an unknown run status)."""


class RecorderStateError(ExpdbError):
    """A DBRecorder method was called out of order (e.g. log_step before start_run)."""


class StorageError(ExpdbError):
    """The database driver failed; the original error is chained as ``__cause__``."""


class DatabaseLockedError(StorageError):
    """Another connection held the write lock for longer than the busy timeout."""


class ConflictError(StorageError):
    """A write broke a constraint (unique key, foreign key)."""


class WriteError(ExpdbError):
    """Buffered rows could not be written; they are still held by the writer."""

"""The write path of the experiment database, behind ``expdb.ExperimentDB`` and ``expdb.DBRecorder``.

Private: nothing outside ``expdb`` imports it (tests/test_architecture.py; tests may). Like
Optuna's ``storages/_rdb``, the rooms of one job sit together here, and the package's public
names stay in ``expdb/__init__.py``:

- ``recorder``: ``DBRecorder``, the trainer's Recorder on a database; the training thread appends.
- ``writer``: ``BufferedWriter``, the background thread that writes batches and retries.
- ``rows``: each table's row as a plain tuple (``RowSpec``) and its INSERT or upsert.
- ``rollups``: the ``step_rollups`` summaries folded from each written batch, or rebuilt.
- ``runs``: writes to the runs row itself (create, resume, checkpoint flags, events).

Connections, sessions and driver errors (``expdb.engine``) and the JSON text format of a row
(``expdb.values``) are shared with the reads, migrations and merges, so they stay outside.
Nothing is imported here: each module is imported by its full path.
"""

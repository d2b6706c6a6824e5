"""The SQL views: short ``pandas.read_sql`` queries over the tables.

Views hold no data, so an upgrade drops every view it may find (of any version) and
creates the current ones; a new version may change them freely.
"""
from __future__ import annotations

from sqlalchemy import Connection

VIEWS = ("run_summary", "study_summary")

# One row per run. n_steps comes from the step rollups (a row per 64 steps) rather than
# counting step_metrics; last_step is a single index probe. duration_s runs to ended_at,
# or while a run is still running (or died without finishing) to its last write, updated_at.
_RUN_SUMMARY = """
CREATE VIEW run_summary AS
SELECT r.id, r.uid, r.name, r.status, r.status_reason, r.study_name, r.trial_number, r.n_params,
       r.device, r.host, r.best_val_loss, r.best_step, r.best_val_bpb,
       COALESCE((SELECT SUM(b.n_rows) FROM step_rollups b WHERE b.run_id = r.id), 0) AS n_steps,
       (SELECT MAX(s.step) FROM step_metrics s WHERE s.run_id = r.id) AS last_step,
       (SELECT COUNT(*) FROM epoch_metrics e WHERE e.run_id = r.id) AS n_epochs,
       r.resume_count, r.started_at, r.ended_at,
       {duration} AS duration_s
FROM runs r
"""

# One row per study: how its runs ended and which one did best (lowest best_val_loss,
# the lower id on a tie). best_val_bpb is the lowest of its runs' (bits per byte compare
# runs of different tokenizers, where losses do not), so it may come from another run.
_STUDY_SUMMARY = """
CREATE VIEW study_summary AS
SELECT r.study_name,
       COUNT(*) AS n_runs,
       SUM(CASE WHEN r.status = 'completed' THEN 1 ELSE 0 END) AS n_completed,
       SUM(CASE WHEN r.status = 'pruned' THEN 1 ELSE 0 END) AS n_pruned,
       SUM(CASE WHEN r.status = 'failed' THEN 1 ELSE 0 END) AS n_failed,
       SUM(CASE WHEN r.status = 'interrupted' THEN 1 ELSE 0 END) AS n_interrupted,
       SUM(CASE WHEN r.status = 'running' THEN 1 ELSE 0 END) AS n_running,
       MIN(r.best_val_loss) AS best_val_loss,
       MIN(r.best_val_bpb) AS best_val_bpb,
       (SELECT b.id FROM runs b WHERE b.study_name = r.study_name AND b.best_val_loss IS NOT NULL
        ORDER BY b.best_val_loss, b.id LIMIT 1) AS best_run_id,
       MIN(r.started_at) AS first_started_at,
       MAX(r.ended_at) AS last_ended_at
FROM runs r
WHERE r.study_name IS NOT NULL
GROUP BY r.study_name
"""

_DURATION = {
    "sqlite": "(julianday(COALESCE(r.ended_at, r.updated_at)) - julianday(r.started_at)) * 86400.0",
    # EXTRACT returns numeric (Decimal in Python): cast so pandas gets floats.
    "postgresql": "CAST(EXTRACT(EPOCH FROM (COALESCE(r.ended_at, r.updated_at) - r.started_at))"
                  " AS DOUBLE PRECISION)",
}


def create_views(conn: Connection) -> None:
    duration = _DURATION.get(conn.dialect.name, "NULL")
    conn.exec_driver_sql(_RUN_SUMMARY.format(duration=duration))
    conn.exec_driver_sql(_STUDY_SUMMARY)


def drop_views(conn: Connection) -> None:
    for name in VIEWS:
        conn.exec_driver_sql(f"DROP VIEW IF EXISTS {name}")

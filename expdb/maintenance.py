"""``check`` (is the database sound, are its checkpoints there and intact?) and ``gc``
(remove rotated-away checkpoints: their rows, and their files when still present).

A checkpoint's recorded sha256 is that of the ``manifest.json`` in its directory (the
manifest lists every file's own sha256: see trainer/checkpoints/format.py), or of the file
itself for a checkpoint that is a single file. Relative paths are taken from ``root``: by
default the database file's own folder, where expdb stores them from (expdb.paths).
"""
from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from sqlalchemy import Connection, delete, select
from sqlalchemy.exc import DBAPIError

from expdb.db import ExperimentDB
from expdb.engine import translated
from expdb.models import Checkpoint, Run
from expdb.values import utcnow

MANIFEST = "manifest.json"
STALE_AFTER = timedelta(hours=1)    # a "running" run silent this long has most likely died


@dataclass
class CheckReport:
    problems: list[str] = field(default_factory=list)       # something is wrong: exit status 1
    notes: list[str] = field(default_factory=list)          # worth knowing, not wrong
    checkpoints_ok: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class GcReport:
    rows: list[int] = field(default_factory=list)           # checkpoint ids removed (or to remove)
    removed: list[str] = field(default_factory=list)        # paths removed (or to remove)
    kept: list[str] = field(default_factory=list)           # why a row or file was left alone
    bytes_freed: int = 0


def check(db: ExperimentDB, root: str | Path | None = None, files: bool = True) -> CheckReport:
    report = CheckReport()
    root = _root(db, root)
    with translated(db.where), db._reader.connect() as conn:
        if conn.dialect.name == "sqlite":
            _sqlite_checks(conn, report)
            if report.problems:
                report.notes.append("the other checks were skipped: the file itself is damaged; salvage "
                                    "it with `sqlite3 OLD.db .recover | sqlite3 NEW.db`")
                return report
        _rollup_check(conn, report)
        _stale_runs(conn, report)
        rows = conn.execute(select(Checkpoint.id, Checkpoint.run_id, Checkpoint.path, Checkpoint.sha256)
                            .where(Checkpoint.deleted.is_(False)).order_by(Checkpoint.id)).all()
    if files:
        newest = {row.path: row for row in rows}        # a path written again: its last row counts
        for row in newest.values():
            _check_checkpoint(row, root, report)
    return report


def _sqlite_checks(conn: Connection, report: CheckReport) -> None:
    try:
        result = [r[0] for r in conn.exec_driver_sql("PRAGMA integrity_check")]
    except DBAPIError as exc:        # damage bad enough to stop the check itself
        result = [f"could not finish: {str(exc.orig).strip()}"]
    if result != ["ok"]:
        report.problems += [f"integrity_check: {line}" for line in result[:20]]
        return
    for table, rowid, parent, _ in conn.exec_driver_sql("PRAGMA foreign_key_check").all()[:20]:
        report.problems.append(f"foreign_key_check: a row of {table} (rowid {rowid}) points to a missing "
                               f"row of {parent}")


def _rollup_check(conn: Connection, report: CheckReport) -> None:
    counted = dict(conn.exec_driver_sql("SELECT run_id, COUNT(*) FROM step_metrics GROUP BY run_id").all())
    summed = dict(conn.exec_driver_sql("SELECT run_id, SUM(n_rows) FROM step_rollups GROUP BY run_id").all())
    for run_id in sorted(set(counted) | set(summed)):
        if counted.get(run_id, 0) != summed.get(run_id, 0):
            report.problems.append(f"run {run_id}: step_rollups count {summed.get(run_id, 0)} steps but "
                                   f"step_metrics holds {counted.get(run_id, 0)} (rows changed outside "
                                   "expdb); rebuild them with `python -m expdb --db URL check --repair`")


def _stale_runs(conn: Connection, report: CheckReport) -> None:
    cutoff = utcnow() - STALE_AFTER
    for run_id, updated_at in conn.execute(select(Run.id, Run.updated_at).where(
            Run.status == "running", Run.updated_at < cutoff)):
        report.notes.append(f"run {run_id} is 'running' but last wrote at {updated_at:%Y-%m-%d %H:%M} UTC: "
                            "it most likely died; resume it from its last checkpoint")


def _check_checkpoint(row, root: Path, report: CheckReport) -> None:
    path = _resolve(row.path, root)
    what = f"checkpoint {row.id} of run {row.run_id} ({path})"
    if not path.exists():
        report.problems.append(f"{what}: missing; if it was rotated away, flag it deleted "
                               "(db.mark_checkpoint_deleted) so that gc drops the row")
        return
    target = path / MANIFEST if path.is_dir() else path
    if not target.is_file():
        report.problems.append(f"{what}: no {MANIFEST}, so the checkpoint is incomplete")
    elif row.sha256 and sha256_of(target) != row.sha256:
        report.problems.append(f"{what}: {target.name} does not match its recorded sha256 (changed or corrupt)")
    else:
        report.checkpoints_ok += 1


def gc(db: ExperimentDB, root: str | Path | None = None, dry_run: bool = False) -> GcReport:
    """Remove the checkpoint rows flagged deleted, and their files where still present.
    A file still named by a live row is kept; so is anything that is not a checkpoint
    (a directory without manifest.json), whose row then stays too."""
    db.require_writable("collect garbage")
    report = GcReport()
    root = _root(db, root)
    with translated(db.where), db._writer.connect() as conn, conn.begin():
        rows = conn.execute(select(Checkpoint.id, Checkpoint.path, Checkpoint.deleted)).all()
        live = {r.path for r in rows if not r.deleted}
        for row in (r for r in rows if r.deleted):
            path = _resolve(row.path, root)
            if row.path in live or not path.exists():
                report.rows.append(row.id)
            elif path.is_dir() and not (path / MANIFEST).is_file():
                report.kept.append(f"{path}: not a checkpoint directory (no {MANIFEST}); left alone, row kept")
            else:
                report.rows.append(row.id)
                report.bytes_freed += _size(path)
                report.removed.append(str(path))
                if not dry_run:
                    _remove(path)
        if report.rows and not dry_run:
            conn.execute(delete(Checkpoint.__table__).where(Checkpoint.__table__.c.id.in_(report.rows)))
    return report


def repair_rollups(db: ExperimentDB) -> int:
    """Summarise every run's steps again; returns the number of runs."""
    from expdb._write import rollups

    db.require_writable("repair the step rollups")
    with translated(db.where), db._writer.connect() as conn, conn.begin():
        run_ids = [r for r, in conn.execute(select(Run.id))]
        rollups.rebuild(conn, run_ids, conn.dialect.paramstyle)
    return len(run_ids)


def sha256_of(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _root(db: ExperimentDB, root: str | Path | None) -> Path:
    if root is not None:
        return Path(root)
    return db.root or Path(".")


def _resolve(path: str, root: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else root / p


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


def relocate(db: ExperimentDB, checkpoints: dict[int, str | None], run_dirs: dict[int, str]) -> None:
    """Point rows at where their files are now (a session pack's copy of a database):
    checkpoint id -> new path, or None for a file not there (flagged deleted); run id -> folder.
    New paths are stored as given: relative ones are taken from the database's folder."""
    from sqlalchemy import update

    db.require_writable("relocate paths")
    checkpoint, runs = Checkpoint.__table__, Run.__table__
    with translated(db.where), db._writer.connect() as conn, conn.begin():
        for cid, path in checkpoints.items():
            values = {"path": path} if path is not None else {"deleted": True}
            conn.execute(update(checkpoint).where(checkpoint.c.id == cid).values(**values))
        for run_id, out_dir in run_dirs.items():
            conn.execute(update(runs).where(runs.c.id == run_id).values(out_dir=out_dir))

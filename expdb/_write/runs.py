"""Writes to the runs row itself: create, resume, mark checkpoints deleted.

Each function takes an open write session (from ExperimentDB's session scope), so the
caller decides the transaction and errors are translated in one place.
"""
from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, delete, select, update
from sqlalchemy.orm import Session

from expdb import paths
from expdb._write import rollups
from expdb.errors import RunMismatchError, UnknownRunError
from expdb.models import Checkpoint, EpochMetric, EvalMetric, Event, Run, StepMetric
from expdb.values import to_json, utcnow
from trainer.recorder import RunInfo


def _described(info: RunInfo, root: Path | None) -> dict[str, Any]:
    """The columns a RunInfo sets, on a new run and again on a resume (the host may differ).
    ``out_dir`` is stored relative to the database's folder ``root`` when inside it (expdb.paths)."""
    out_dir = info.config.get("out_dir")
    return dict(config=to_json(info.config), dataset=to_json(info.dataset),
                tokenizer=to_json(info.tokenizer), n_params=info.n_params, device=info.device,
                precision=info.precision, host=info.host,
                out_dir=paths.portable(out_dir, root) if out_dir else out_dir)


def insert_run(session: Session, info: RunInfo, study_name: str | None,
               trial_number: int | None, root: Path | None = None) -> int:
    now = utcnow()
    # The trainer names the run (its checkpoints carry the uid, so any database finds the row again).
    run = Run(uid=info.extra.get("run_uid") or uuid.uuid4().hex, name=info.name, status="running", study_name=study_name, trial_number=trial_number,
              started_at=now, updated_at=now, resume_count=0, **_described(info, root))
    session.add(run)
    session.flush()         # assigns run.id
    return run.id


def find_run_by_uid(session: Session, uid: str) -> int | None:
    return session.execute(select(Run.id).where(Run.uid == uid)).scalar()


def find_trial_run(session: Session, study_name: str, trial_number: int) -> int | None:
    return session.execute(select(Run.id).where(Run.study_name == study_name,
                                                Run.trial_number == trial_number)).scalar()


def resume_run(session: Session, run_id: int, info: RunInfo, resume_step: int,
               root: Path | None = None, by_uid: bool = False) -> tuple[float | None, int | None]:
    """Continue ``run_id``: history after ``resume_step`` is deleted (the resumed run logs it
    again), the best validation loss is recomputed from what is left. Returns that best.
    ``by_uid``: the row was found by the uid the checkpoint carries, so a moved folder or a
    renamed run is still this run."""
    run = session.get(Run, run_id)
    if run is None:
        raise UnknownRunError(run_id)
    described = _described(info, root)
    if not by_uid and run.name != info.name and run.out_dir not in (info.config.get("out_dir"), described["out_dir"]):
        # Resuming would delete the later history of somebody else's run.
        raise RunMismatchError(run_id, (
            f"run {run_id} of this database is {run.name!r} (out_dir {run.out_dir}), not {info.name!r} "
            f"(out_dir {info.config.get('out_dir')}); it was left alone. Run ids belong to one database: "
            "resume against the database the checkpoint's run was recorded in, or start a new run"))
    deleted = {model.__tablename__: _delete_after(session, model, run_id, resume_step)
               for model in (StepMetric, EvalMetric, EpochMetric)}
    conn = session.connection()
    rollups.refresh_after(conn, run_id, resume_step, conn.dialect.paramstyle)
    best = session.execute(
        select(EvalMetric.val_loss, EvalMetric.step, EvalMetric.val_bpb)
        .where(EvalMetric.run_id == run_id, EvalMetric.val_loss.is_not(None))
        .order_by(EvalMetric.val_loss, EvalMetric.step).limit(1)).first()
    now = utcnow()
    for column, value in described.items():
        setattr(run, column, value)
    run.status, run.status_reason, run.ended_at, run.updated_at = "running", None, None, now
    run.resume_count += 1
    run.best_val_loss, run.best_step, run.best_val_bpb = tuple(best) if best else (None, None, None)
    session.add(Event(run_id=run_id, kind="resume", step=resume_step if resume_step >= 0 else None,
                      created_at=now, detail=to_json({"resume_step": resume_step,
                                                      "resume_count": run.resume_count,
                                                      "host": info.host, "deleted_rows": deleted})))
    return run.best_val_loss, run.best_step


def _delete_after(session: Session, model: type, run_id: int, step: int) -> int:
    table = model.__table__
    result = session.execute(delete(table).where(table.c.run_id == run_id, table.c.step > step))
    return result.rowcount


def mark_checkpoint_deleted(session: Session | Connection, run_id: int, path: str) -> int:
    """Flag the rows of a checkpoint file that was rotated away; returns how many."""
    table = Checkpoint.__table__
    result = session.execute(update(table).where(table.c.run_id == run_id, table.c.path == path,
                                                 table.c.deleted.is_(False)).values(deleted=True))
    return result.rowcount


def add_event(session: Session, run_id: int, kind: str, step: int | None, detail: dict[str, Any]) -> None:
    if session.get(Run, run_id) is None:
        raise UnknownRunError(run_id)
    session.add(Event(run_id=run_id, kind=kind, step=step, created_at=utcnow(), detail=to_json(detail)))

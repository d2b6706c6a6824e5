"""Replay runs already in the database into a tracker: ``python -m expdb export --to ...``.

The same mirror classes as during training, fed from the database's DataFrames in step
order, on the caller's thread (nothing to protect here, so a failure raises MirrorError).
TensorBoard: the replay opens the writer with ``purge_step=0``, so it replaces whatever an
earlier export or live mirror wrote into that folder instead of doubling it. W&B: the run's
uid is its id again, so a replay continues the W&B run the live mirror made (or the one an
earlier replay made) and sends only the steps it lacks.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from expdb.mirrors.base import CheckpointRef, Mirror, MirrorError, MirrorRun, RunEnd, describe, finite
from expdb.mirrors.factory import parse_report_to
from expdb.mirrors.tensorboard import SUBDIR, TensorBoardMirror
from expdb.mirrors.wandb import WandbMirror
from trainer.recorder import RunInfo

_ORDER = {"step": 0, "eval": 1, "epoch": 2, "checkpoint": 3, "event": 4}     # within one step
_NOT_METRICS = ("run_id", "step", "recorded_at", "nan_columns")


def replay(db: Any, run_ids: Iterable[int], to: str, *, out_dir: str | Path | None = None,
           project: str | None = None, entity: str | None = None,
           log: Callable[[str], None] = print) -> list[str]:
    """Feed each run to a new ``to`` mirror ("tensorboard" or "wandb"); returns where each went.

    ``out_dir``: TensorBoard writes ``<out_dir>/<run id>-<name>/`` and W&B ``<out_dir>/wandb``;
    without it, each run's own folder (``<run out_dir>/tensorboard``, ``<run out_dir>/wandb``).
    """
    names = parse_report_to(to)
    if len(names) != 1:
        raise MirrorError(f"--to {to}: name one tracker, tensorboard or wandb")
    done = []
    for run_id in run_ids:
        record = db.run(int(run_id))
        mirror, target = _mirror(names[0], record, out_dir, project, entity)
        replay_run(mirror, db, record, _run_dir(record, out_dir))
        done.append(f"run {record.id} ({record.name}) -> {names[0]} {target}")
        log(done[-1])
    return done


def replay_run(mirror: Mirror, db: Any, record: Any, out_dir: Path) -> None:
    """One run into ``mirror``; the mirror is released and MirrorError raised on a failure."""
    # TensorBoard: as a resume from step -1, i.e. purge_step 0, which hides earlier exports.
    resume = -1 if mirror.name == "tensorboard" else None
    run = MirrorRun(run_info(record), record.id, str(out_dir), record.uid, resume_step=resume)
    try:
        mirror.open(run)
        for method, args in history_calls(db, record.id):
            getattr(mirror, method)(*args)
        mirror.close(run_end(db, record))
    except Exception as exc:            # noqa: BLE001 - reported with the mirror's own fix
        mirror.abandon()
        raise MirrorError(f"{mirror.name}: replay of run {record.id} failed: {describe(exc)}. "
                          f"Fix: {mirror.fix_for(exc)}") from exc


def run_info(record: Any) -> RunInfo:
    return RunInfo(name=record.name, config=record.config or {}, dataset=record.dataset or {},
                   tokenizer=record.tokenizer or {}, n_params=record.n_params or 0, device=record.device or "",
                   precision=record.precision or "", host=record.host or "", study_name=record.study_name,
                   trial_number=record.trial_number)


def run_end(db: Any, record: Any) -> RunEnd:
    evals = db.evals(record.id)
    steps = db.steps(record.id)
    final = finite(evals["val_loss"].iloc[-1]) if len(evals) else None
    last = int(steps["step"].max()) if len(steps) else None
    return RunEnd(record.status, record.status_reason, record.best_val_loss, record.best_step, final, last,
                  finite(getattr(record, "best_val_bpb", None)))


def history_calls(db: Any, run_id: int) -> list[tuple[str, tuple]]:
    """Every mirror call of a run, ordered as the trainer made them: by step, then kind."""
    keyed = []
    for index, (step, method, args) in enumerate(_calls(db, run_id)):
        keyed.append(((step, _ORDER[method], index), (method, args)))
    return [call for _, call in sorted(keyed, key=lambda pair: pair[0])]


def _calls(db: Any, run_id: int) -> Iterator[tuple[int, str, tuple]]:
    for row in _rows(db.steps(run_id)):
        yield row["step"], "step", (row["step"], _metrics(row))
    for row in _rows(db.evals(run_id)):
        yield row["step"], "eval", (row["step"], row.get("epoch"), _metrics(row, drop=("epoch",)))
    for row in _rows(db.epochs(run_id)):
        step = row.get("step")
        yield (step if step is not None else 0), "epoch", (row["epoch"], _metrics(row, drop=("epoch",), keep_step=True))
    for row in _rows(db.checkpoints(run_id)):
        yield row.get("step") or 0, "checkpoint", (CheckpointRef(
            row["path"], row["kind"], row.get("step"), finite(row.get("val_loss")), row.get("size_bytes"),
            row.get("sha256")),)
    for row in _rows(db.events(run_id)):
        yield row.get("step") or 0, "event", (row["kind"], row.get("step"), row.get("detail") or {})


def _rows(frame: Any) -> Iterator[dict[str, Any]]:
    for row in frame.to_dict("records"):
        yield {k: _plain(v) for k, v in row.items()}


def _plain(value: Any) -> Any:
    """NaN-for-NULL back to None, numpy scalars to Python ones."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _metrics(row: dict[str, Any], drop: tuple[str, ...] = (), keep_step: bool = False) -> dict[str, Any]:
    skip = set(_NOT_METRICS + drop + ("path", "kind", "created_at", "deleted", "sha256"))
    if keep_step:
        skip.discard("step")
    return {k: v for k, v in row.items() if k not in skip and v is not None and not isinstance(v, str)}


def _run_dir(record: Any, out_dir: str | Path | None) -> Path:
    if out_dir is not None:
        return Path(out_dir)
    if not record.out_dir:
        raise MirrorError(f"run {record.id} has no out_dir in the database; pass --out-dir")
    return Path(record.out_dir)


def _mirror(name: str, record: Any, out_dir: str | Path | None, project: str | None,
            entity: str | None) -> tuple[Mirror, Path]:
    base = _run_dir(record, out_dir)
    if name == "tensorboard":
        # An export folder holds many runs, one TensorBoard run folder each.
        log_dir = base / f"{record.id}-{record.name.replace('/', '-')}" if out_dir is not None else base / SUBDIR
        return TensorBoardMirror(log_dir), log_dir
    return WandbMirror(project, entity, wandb_dir=base), base / "wandb"

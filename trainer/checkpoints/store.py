"""A run's checkpoints folder: what is in it, what to keep, and its history.

    out_dir/checkpoints/
        step-0000100/            complete checkpoints (each with a manifest.json)
        latest                   the name of the newest complete checkpoint, for people and scripts
        training_history.json    every checkpoint written or deleted, and the run's events

Rotation keeps the N newest, plus the best by validation loss, which is never deleted;
``--max-checkpoint-gb`` then deletes the oldest of the rest until the folder fits. It runs
only after a checkpoint of this run is complete, so the one a run resumed from is never
deleted before a newer one exists. Every write and deletion goes to the recorder.

A write that fails (a full disk, any OS error of the folder) is a fault the run survives: its
temporary directory is removed, a ``checkpoint_failed`` event records the reason and the free
space, one warning names the fixes, every checkpoint but the newest complete and the best is
deleted to make room, and training goes on; the next interval tries again. The history and
``latest`` are hints: a full disk leaves them stale, not the run stopped.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from trainer.checkpoints.capture import capture, tensor_sources
from trainer.checkpoints.format import (OLD_PREFIX, STEP_PREFIX, CheckpointInfo, SaveResult, publish, read_info,
                                        step_dir_name)
from trainer.checkpoints.writer import BackgroundWriter
from trainer.config import TrainConfig
from trainer.errors import CheckpointError
from trainer.files import TMP_PREFIX, atomic_write_json, atomic_write_text, free_bytes, pause_point
from trainer.recorder import EVENT_CHECKPOINT_DELETED, EVENT_CHECKPOINT_FAILED, Recorder

LATEST_FILE = "latest"
HISTORY_FILE = "training_history.json"
QUARANTINE_PREFIX = "corrupt-"    # a corrupt checkpoint moved aside by --resume auto

# Keys of training_history.json.
H_RUN_ID, H_LATEST, H_BEST, H_CHECKPOINTS, H_EVENTS = "run_id", "latest", "best", "checkpoints", "events"
H_PATH, H_BYTES, H_SHA256, H_DELETED_AT = "path", "bytes", "sha256", "deleted_at"
GB = 1e9


def scan(root: Path) -> list[CheckpointInfo]:
    """Checkpoints with a readable manifest in ``root``, newest first (their files unhashed: see verify)."""
    found = []
    for d in sorted(Path(root).glob(f"{STEP_PREFIX}*")):
        try:
            found.append(read_info(d))
        except CheckpointError:
            continue     # without a complete manifest, a checkpoint does not exist
    return sorted(found, key=newest_first)


def newest_first(c: CheckpointInfo) -> tuple[float, int]:
    # The time written, not the step: after a rewind (--resume PATH to an older one) the
    # checkpoints of the abandoned timeline have higher steps but are older.
    return (-c.written_at, -c.step)


def best_of(stored: list[CheckpointInfo]) -> CheckpointInfo | None:
    """The lowest validation loss measured at a checkpoint's own step (the newest on ties)."""
    scored = [c for c in stored if c.val_loss is not None]
    return min(scored, key=lambda c: (c.val_loss, newest_first(c))) if scored else None


def plan_rotation(stored: list[CheckpointInfo], keep: int, max_bytes: float,
                  protected: set[Path]) -> list[CheckpointInfo]:
    """The checkpoints to delete: beyond the ``keep`` newest, then the oldest while over budget.

    Never the newest, the best, or a protected one.
    """
    ordered = sorted(stored, key=newest_first)
    best = best_of(ordered)
    spared = set(protected) | {s.path for s in ordered[:1]} | ({best.path} if best else set())
    delete = [s for s in ordered[keep:] if s.path not in spared]
    kept = [s for s in ordered if s not in delete]
    total = sum(s.size_bytes for s in kept)
    for s in reversed(kept):
        if not max_bytes or total <= max_bytes:
            break
        if s.path not in spared:
            delete.append(s)
            total -= s.size_bytes
    return delete


class CheckpointStore:
    """Writes this run's checkpoints in the background, records them, rotates them."""

    def __init__(self, root: Path, cfg: TrainConfig, recorder: Recorder, log=print):
        self.root = Path(root).resolve()
        self.cfg, self.recorder, self.log = cfg, recorder, log
        self.writer = BackgroundWriter()
        self._last: tuple[int, int, Path] | None = None   # (step, moment, path) of the newest save started
        self._latest_complete: Path | None = None
        self._history: dict[str, Any] = {H_CHECKPOINTS: [], H_EVENTS: []}
        self._budget_warned = False
        self._hint_warned = False
        self._prepared = False
        self._done: list[SaveResult] = []            # recorded, not yet handed to poll's caller
        self._unrecorded: list[CheckpointInfo] = []  # published by a run killed before recording them

    def open(self, resumed_from: Path | None) -> None:
        """Clear what killed runs left half-written; continue the history of a resumed run."""
        self.root.mkdir(parents=True, exist_ok=True)
        for leftover in [*self.root.glob(f"{TMP_PREFIX}*"), *self.root.glob(f"{OLD_PREFIX}*")]:
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
        if resumed_from is not None:
            resumed_from = Path(resumed_from).resolve()
            self._history = _read_history(self.root / HISTORY_FILE, resumed_from.parent / HISTORY_FILE)
            self._unrecorded = [s for s in reversed(scan(self.root)) if not self._live_entries(str(s.path))]
            self._latest_complete = resumed_from
            if resumed_from.parent == self.root:
                self._last = (read_info(resumed_from).step, 0, resumed_from)

    def set_run_id(self, run_id: int | None) -> None:
        self._history[H_RUN_ID] = run_id

    def reconcile(self) -> None:
        """After a kill (once the run exists): record checkpoints on disk that the history lacks,
        and mark deleted those it lists that never got renamed into place."""
        for entry in list(self._history[H_CHECKPOINTS]):
            if entry[H_DELETED_AT] is None and Path(entry[H_PATH]).parent == self.root \
                    and not Path(entry[H_PATH]).is_dir():
                self._mark_deleted(entry, entry["step"])
        for found in self._unrecorded:
            if found.path.is_dir():
                self._record(found)
        self._unrecorded = []
        self._write_history()

    @property
    def latest_path(self) -> str | None:
        """The newest complete checkpoint of this run (the one resumed from, before any)."""
        return str(self._latest_complete) if self._latest_complete else None

    def save(self, kind: str, moment: int, **capture_args: Any) -> str:
        """Start writing a checkpoint of this step; return its path.

        ``moment`` counts the optimizer steps this process has taken: a second save at the
        same moment (a signal right after a periodic save) returns the first one's path,
        while a step retaken after a reload to an older checkpoint is saved anew.
        """
        step = capture_args["state"].step
        if self._last and self._last[:2] == (step, moment):
            return str(self._last[2])      # this very state is already saved (or being saved)
        if not self.cfg.save_optimizer_state:
            capture_args["optimizer"] = None
        path = self.root / step_dir_name(step)
        self._handle(self.writer.drain(), final=False)    # a second save waits for the first
        self.writer.save(path, lambda buffers: capture(kind=kind, buffers=buffers, **capture_args))
        self._last = (step, moment, path)
        return str(path)

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Once the optimizer has state: allocate the snapshot buffers in the background."""
        if not self._prepared:
            self._prepared = True
            optimizer = optimizer if self.cfg.save_optimizer_state else None
            self.writer.prepare_buffers(tensor_sources(model, optimizer))

    def poll(self) -> list[SaveResult]:
        """Publish, record and rotate the writes that finished; return them. Never blocks."""
        self._handle(self.writer.poll(), final=False)
        done, self._done = self._done, []
        return done

    def drain(self) -> list[SaveResult]:
        """Wait for the write in flight and do the same; raise CheckpointError if it failed."""
        self._handle(self.writer.drain(), final=True)
        done, self._done = self._done, []
        return done

    def newest_before(self, step: int) -> CheckpointInfo | None:
        """The newest complete checkpoint of a step before ``step``, once the write in flight is done."""
        self.drain()
        return next((c for c in scan(self.root) if c.step < step), None)

    def event(self, kind: str, step: int, detail: dict[str, Any]) -> None:
        """Record an event in the recorder and in training_history.json."""
        self.recorder.log_event(kind, step, detail)
        self._history[H_EVENTS].append({"kind": kind, "step": step, "time": time.time(), "detail": detail})
        self._write_history()

    def quarantine(self, path: Path, step: int) -> Path:
        """Move a corrupt checkpoint of this folder aside, so nothing takes it for one again."""
        path = Path(path).resolve()
        target = path.with_name(f"{QUARANTINE_PREFIX}{path.name}-{int(time.time())}")
        os.replace(path, target)
        self._forget(path, step)
        return target

    # -- after a write -------------------------------------------------------------------
    def _handle(self, outcomes: list[SaveResult], final: bool) -> None:
        for outcome in outcomes:
            try:
                if outcome.error is not None:
                    raise outcome.error
                self._done.append(self._publish(outcome))
            except (OSError, CheckpointError) as exc:
                self._failed(outcome, exc)
                if final:
                    raise CheckpointError(f"checkpoint {outcome.path} could not be written ({exc}); the last "
                                          f"complete one is named in {self.root / LATEST_FILE}") from exc

    def _failed(self, outcome: SaveResult, exc: BaseException) -> None:
        """Record a write that failed, say what to do, and free what rotation may for the next."""
        free = free_bytes(self.root)
        where = f"{free / GB:.2f} GB free in {self.root}" if free is not None else f"free space in {self.root} unknown"
        self.log(f"warning: checkpoint of step {outcome.info.step} not written ({exc}; {where}); training goes "
                 f"on and the next checkpoint is tried at the next interval. To need less disk: --keep-checkpoints "
                 f"{max(1, self.cfg.keep_checkpoints - 1)}, --max-checkpoint-gb, --save-optimizer-state false, "
                 "or free space")
        self.event(EVENT_CHECKPOINT_FAILED, outcome.info.step, {"path": str(outcome.path), "error": str(exc),
                                                                "free_bytes": free})
        stored = scan(self.root)
        protected = {self.writer.in_flight} if self.writer.in_flight else set()
        for doomed in plan_rotation(stored, 1, 0, protected):     # all but the newest and the best
            self._delete(doomed)
        self._write_history()

    def _publish(self, prepared: SaveResult) -> SaveResult:
        """Record a written checkpoint, then rename it into place, then rotate.

        In this order a kill leaves nothing unrecorded: the recorder's call also stores the
        step metrics the checkpoint holds, and what was recorded but never renamed is
        marked deleted by the next resume (it is in training_history.json).
        """
        self._record(prepared.info)
        try:
            saved = publish(prepared)
        except OSError:
            self._forget(prepared.path, prepared.info.step)
            raise
        # Hints, so not fsynced (a resume checks manifests, and records what history missed).
        self._write_hint(lambda: atomic_write_text(self.root / LATEST_FILE, saved.path.name + "\n"))
        self._latest_complete = saved.path
        self._rotate(saved)
        self._write_history()
        return saved

    def _record(self, info: CheckpointInfo) -> None:
        path = str(info.path)
        for entry in self._live_entries(path):     # a checkpoint of this step is being replaced
            self._mark_deleted(entry, info.step)
        self._history[H_CHECKPOINTS].append({**info.manifest_fields(), "name": info.path.name, H_PATH: path,
                                             H_BYTES: info.size_bytes, H_SHA256: info.sha256,
                                             H_DELETED_AT: None})
        self._write_history()
        self.recorder.log_checkpoint(path, info.kind, info.step, info.val_loss, info.size_bytes, info.sha256)

    def _rotate(self, newest: SaveResult) -> None:
        stored = scan(self.root)
        protected = {newest.path} | ({self.writer.in_flight} if self.writer.in_flight else set())
        doomed = plan_rotation(stored, self.cfg.keep_checkpoints, self.cfg.max_checkpoint_gb * GB, protected)
        for d in doomed:
            self._delete(d)
        stored = [s for s in stored if s not in doomed]
        kept = sum(s.size_bytes for s in stored)
        if self.cfg.max_checkpoint_gb and kept > self.cfg.max_checkpoint_gb * GB and not self._budget_warned:
            self._budget_warned = True
            self.log(f"warning: the newest and the best checkpoint alone take {kept / GB:.2f} GB, over "
                     f"--max-checkpoint-gb {self.cfg.max_checkpoint_gb}; raise it or save less "
                     "(--save-optimizer-state false)")
        best = best_of(stored)
        self._history[H_BEST] = best.path.name if best else None
        self._history[H_LATEST] = newest.path.name

    def _delete(self, doomed: CheckpointInfo) -> None:
        # Renamed first: a half-deleted directory must never look like a checkpoint.
        aside = doomed.path.with_name(f"{OLD_PREFIX}{doomed.path.name}-{os.getpid()}")
        os.replace(doomed.path, aside)
        pause_point("checkpoint-rotation")     # tests kill here (TRAINER_PAUSE_AT): the next start tidies it
        shutil.rmtree(aside, ignore_errors=True)
        self._forget(doomed.path, doomed.step)

    def _forget(self, path: Path, step: int) -> None:
        """Record that the checkpoint at ``path`` is gone."""
        entries = self._live_entries(str(path))
        for entry in entries:
            self._mark_deleted(entry, step)
        if not entries:    # written before this history began
            self.recorder.log_event(EVENT_CHECKPOINT_DELETED, step, {"path": str(path)})

    def _live_entries(self, path: str) -> list[dict[str, Any]]:
        return [e for e in self._history[H_CHECKPOINTS] if e[H_PATH] == path and e[H_DELETED_AT] is None]

    def _mark_deleted(self, entry: dict[str, Any], step: int) -> None:
        entry[H_DELETED_AT] = time.time()
        self.recorder.log_event(EVENT_CHECKPOINT_DELETED, step, {"path": entry[H_PATH]})

    def _write_history(self) -> None:
        self._write_hint(lambda: atomic_write_json(self.root / HISTORY_FILE, self._history))

    def _write_hint(self, write) -> None:
        """training_history.json and latest, which a resume does not need (it reads manifests and
        records what the history missed): a full disk leaves them stale until the next write."""
        try:
            write()
        except OSError as exc:
            if not self._hint_warned:
                self._hint_warned = True
                self.log(f"warning: {self.root / HISTORY_FILE} not updated ({exc}); kept in memory, written "
                         "again at the next checkpoint")


def _read_history(*candidates: Path) -> dict[str, Any]:
    """The first readable history (this folder's, else the resumed checkpoint's folder's)."""
    for path in candidates:
        try:
            history = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(history.get(H_CHECKPOINTS), list) and isinstance(history.get(H_EVENTS), list):
                return history
        except (OSError, ValueError, AttributeError):
            continue
    return {H_CHECKPOINTS: [], H_EVENTS: []}

"""Which checkpoint a run continues from (--resume auto | PATH), and the checks around it.

``--resume auto`` looks in the run's own checkpoints folder and in every --resume-from
directory, orders what it finds newest first (by the time each was written), and takes
the first whose files all match its manifest. Newer ones that do not are reported, and
in the run's own folder moved aside (``corrupt-step-...``), so the next restart does not
trip over them again.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.checkpoints.format import (KEY_CHECKPOINT, KEY_CONFIG, MANIFEST_FILE, STATE_FILE, STEP_PREFIX,
                                        CheckpointInfo, read_manifest, verify_checkpoint)
from trainer.checkpoints.store import CheckpointStore, newest_first, scan
from trainer.config import ARCH_GPT2, TrainConfig, flag
from trainer.errors import CheckpointError, ConfigError
from trainer.recorder import EVENT_CORRUPT_CHECKPOINT, EVENT_RESUME_CHECKPOINT

# Settings that must match for a checkpoint's weights to fit the model.
ARCHITECTURE_KEYS = ("arch", "n_layer", "n_embd", "n_head", "block_size", "tokenizer", "vocab_size")
# What a checkpoint written before a setting existed was trained with.
SAVED_DEFAULTS = {"arch": ARCH_GPT2}
# Settings that do not change what is trained: no warning when a resume changes them.
OPERATIONAL_KEYS = frozenset({
    "out_dir", "cache_dir", "run_name", "progress", "device", "resume", "resume_from", "time_budget",
    "deadline", "keep_checkpoints", "max_checkpoint_gb", "save_every", "save_on_eval",
    "save_optimizer_state", "log_every", "compile"})
SEARCH_DEPTH = 4     # how deep --resume-from directories are searched for checkpoints


@dataclass(frozen=True)
class ResumePlan:
    """Where a run starts: ``path`` None means fresh."""

    path: Path | None
    info: CheckpointInfo | None
    reason: str                                   # why, in words
    corrupt: tuple[tuple[Path, str], ...] = ()    # (path, problem): failed verification, newest first
    passed_over: tuple[tuple[str, str], ...] = ()  # (path, why): other models under --resume-from


def checkpoints_root(cfg: TrainConfig) -> Path:
    return Path(cfg.out_dir) / "checkpoints"


def plan_resume(cfg: TrainConfig) -> ResumePlan:
    """The checkpoint ``cfg.resume`` asks for. Raises CheckpointError or ConfigError."""
    if not cfg.resume:
        _refuse_to_overwrite(cfg)
        return ResumePlan(None, None, "no --resume")
    if cfg.resume != "auto":
        manifest = _named_checkpoint(cfg, verify_checkpoint)
        return ResumePlan(Path(cfg.resume).resolve(), manifest[KEY_CHECKPOINT], "named by --resume")
    return _newest_valid(cfg)


def precheck_resume(cfg: TrainConfig) -> None:
    """The cheap part of plan_resume (no hashing), for the command line to fail before the data."""
    if not cfg.resume:
        _refuse_to_overwrite(cfg)
    elif cfg.resume == "auto":
        _check_own_fit(cfg, scan(checkpoints_root(cfg)))
    else:
        _named_checkpoint(cfg, read_manifest)


def _named_checkpoint(cfg: TrainConfig, check) -> dict[str, Any]:
    try:
        return check(Path(cfg.resume))
    except CheckpointError as exc:
        raise CheckpointError(f"--resume {cfg.resume!r}: {exc}; pass a complete checkpoint directory, "
                              "or --resume auto to pick the newest valid one") from exc


def config_changes(saved: dict[str, Any], cfg: TrainConfig) -> list[str]:
    """Settings that differ from the checkpoint's and change what is trained, one line each."""
    now, saved = cfg.to_dict(), {**SAVED_DEFAULTS, **saved}
    return [f"{flag(k)} is {now[k]!r}, the checkpoint was trained with {saved[k]!r}"
            for k in sorted(now) if k not in OPERATIONAL_KEYS and k in saved and saved[k] != now[k]]


def _newest_valid(cfg: TrainConfig) -> ResumePlan:
    own = scan(checkpoints_root(cfg))
    _check_own_fit(cfg, own)
    elsewhere, passed_over = _search(cfg)
    candidates = sorted(own + elsewhere, key=newest_first)
    corrupt = [(p, "its manifest is missing or unreadable") for p in _broken_manifests(checkpoints_root(cfg))]
    where = ", ".join([str(checkpoints_root(cfg)), *cfg.resume_from])
    for c in candidates:
        try:
            verify_checkpoint(c.path)
        except CheckpointError as exc:
            corrupt.append((c.path, str(exc)))
            continue
        reason = (f"the newest valid of {len(candidates)} checkpoint(s) found in {where} (written "
                  f"{_age(c.written_at)}; step {c.step}, epoch {c.epoch})")
        return ResumePlan(c.path.resolve(), c, reason, tuple(corrupt), tuple(passed_over))
    reason = f"--resume auto found no valid checkpoint in {where}; starting fresh"
    return ResumePlan(None, None, reason, tuple(corrupt), tuple(passed_over))


def _search(cfg: TrainConfig) -> tuple[list[CheckpointInfo], list[tuple[str, str]]]:
    """Checkpoints of this model under the --resume-from directories, and those passed over."""
    found, skipped = [], []
    own_root = checkpoints_root(cfg).resolve()
    for top in cfg.resume_from:
        for d in _checkpoint_dirs(Path(top)):
            if d.resolve().parent == own_root:
                continue
            try:
                info = read_manifest(d)[KEY_CHECKPOINT]
                mismatch = _architecture_mismatch(_saved_config(d), cfg)
            except CheckpointError as exc:
                skipped.append((str(d), str(exc)))
                continue
            if mismatch:
                skipped.append((str(d), f"another model ({mismatch})"))
            else:
                found.append(info)
    return found, skipped


def _checkpoint_dirs(top: Path) -> list[Path]:
    """Directories with a manifest under ``top`` (itself included), at most SEARCH_DEPTH deep."""
    out = []
    for root, dirs, files in os.walk(top):
        depth = len(Path(root).relative_to(top).parts)
        dirs[:] = [d for d in dirs if not d.startswith(".") and depth < SEARCH_DEPTH]
        if MANIFEST_FILE in files:
            out.append(Path(root))
            dirs[:] = []
    return out


def _broken_manifests(root: Path) -> list[Path]:
    broken = []
    for d in sorted(root.glob(f"{STEP_PREFIX}*")):
        try:
            read_manifest(d)
        except CheckpointError:
            broken.append(d)
    return broken


def _check_own_fit(cfg: TrainConfig, own: list[CheckpointInfo]) -> None:
    """Checkpoints in --out of another model are an error: resuming fresh would rotate them away."""
    for c in own:
        try:
            mismatch = _architecture_mismatch(_saved_config(c.path), cfg)
        except CheckpointError:
            continue    # reported as corrupt when its turn comes
        if mismatch:
            raise ConfigError([f"--resume auto: the checkpoints in {c.path.parent} are of another model "
                               f"({mismatch}); use the same settings, or another --out"])


def _refuse_to_overwrite(cfg: TrainConfig) -> None:
    existing = scan(checkpoints_root(cfg))
    if existing:
        raise ConfigError([f"--out {cfg.out_dir!r} already holds checkpoints of a run (newest: "
                           f"{existing[0].path.name}); continue it with --resume auto, or choose "
                           "another --out (nothing was changed)"])


def _saved_config(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / STATE_FILE).read_text(encoding="utf-8"))[KEY_CONFIG]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path}: unreadable {STATE_FILE} ({exc!r})") from exc


def _architecture_mismatch(saved: dict[str, Any], cfg: TrainConfig) -> str:
    now, saved = cfg.to_dict(), {**SAVED_DEFAULTS, **saved}
    keys = [k for k in ARCHITECTURE_KEYS if not (k == "vocab_size" and now["tokenizer"] != "bpe")]
    return ", ".join(f"{flag(k)} {saved.get(k)!r} there, {now[k]!r} here" for k in keys if saved.get(k) != now[k])


def _age(written_at: float) -> str:
    minutes = (time.time() - written_at) / 60
    return f"{minutes:.0f} min ago" if minutes < 120 else f"{minutes / 60:.1f} h ago"


def resume_notes(plan: ResumePlan, saved_config: dict[str, Any], cfg: TrainConfig) -> list[str]:
    """What makes the resumed run differ from an uninterrupted one, one warning each."""
    notes = [f"{change}: the resumed run will not match the original" for change in config_changes(saved_config, cfg)]
    if plan.info is not None and plan.info.weights_only:
        notes.append(f"{plan.path} holds weights only (--save-optimizer-state false): the optimizer "
                     "restarts from zero moments, so the run will not match an uninterrupted one")
    return notes


def report_resume(plan: ResumePlan, store: CheckpointStore, step: int, notes: list[str], log=print) -> None:
    """Record what --resume decided: corrupt checkpoints (moved aside in --out), and the pick."""
    own_root = store.root
    for path, problem in plan.corrupt:
        own = Path(path).resolve().parent == own_root and Path(path).exists()
        moved = store.quarantine(path, _step_of(path)) if own else None
        log(f"warning: skipped {path}: {problem}" + (f"; moved to {moved.name}" if moved else ""))
        store.event(EVENT_CORRUPT_CHECKPOINT, step, {"path": str(path), "problem": problem,
                                                     "moved_to": str(moved) if moved else None})
    for path, why in plan.passed_over:
        log(f"skipped {path}: {why}")
    if plan.path is not None:
        store.event(EVENT_RESUME_CHECKPOINT, step, {
            "path": str(plan.path), "reason": plan.reason, "weights_only": bool(plan.info.weights_only),
            "config_changes": notes, "passed_over": [p for p, _ in plan.passed_over]})


def _step_of(path: Path) -> int:
    try:
        return int(Path(path).name[len(STEP_PREFIX):])
    except ValueError:
        return -1

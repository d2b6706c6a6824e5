"""A study-wide disk budget (--max-disk-gb, --keep-best-trials).

Kaggle keeps 20 GB of /kaggle/working; a study that keeps every trial's checkpoints
outgrows it (30 trials x 5 checkpoints x 232 MB at kaggle-t4 = 35 GB). With a budget:

- when a trial ends, its checkpoints are removed (a finished trial is never resumed), and
  so is every final_model/ but those of the K best completed trials: nothing of pruned or
  failed trials stays. Each removal is recorded: checkpoint rows flagged deleted, an event
  on the trial's run;
- before a trial starts, the study checks that the budget and the free disk can hold what
  the trial will write at its peak (its checkpoint rotation, its final model) plus the
  session pack, and stops with a message saying what to change otherwise.

Only files under the study's own folder are removed: an input read in place is never touched.
A folder is renamed aside before it is deleted, and the check before each trial first
finishes any clean-up that a killed process left (``sweep``).
"""
from __future__ import annotations

import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from studies.context import StudyContext, TrialOutcome
from studies.trial import RUN_ID_ATTR
from trainer.config import TrainConfig
from trainer.files import TMP_PREFIX, pause_point

GB = 1e9
MB = 1e6
EVENT_FILES_REMOVED = "study_files_removed"   # detail: {"paths", "bytes", "why"}
# Rotation at its peak: --keep-checkpoints newest, the best (never rotated), and one being written.
ROTATION_EXTRA = 2
PACK_COPIES = 2           # the pack is a folder and a .tar of it
TRASH_PREFIX = f"{TMP_PREFIX}removing-"     # a folder renamed aside, being deleted
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)


@dataclass(frozen=True)
class DiskBudget:
    max_bytes: float
    keep_best: int = 3

    def refusal(self, ctx: StudyContext, number: int) -> str | None:
        """Why trial ``number`` may not start (None: it may), measured now (after finishing any
        clean-up that a killed process left undone)."""
        self.sweep(ctx)
        cfg = ctx.base.replace(**_params_of(ctx, number))
        need = trial_peak_bytes(cfg, ctx.data.vocab_size) + pack_bytes(ctx, cfg)
        used = study_bytes(ctx)
        free = shutil.disk_usage(_existing(ctx.out_dir)).free
        budget = f"--max-disk-gb {self.max_bytes / GB:g}"
        if used + need > self.max_bytes:
            return (f"{budget}: the study's files take {used / GB:.2f} GB and trial {number} needs "
                    f"{need / GB:.2f} GB more at its peak (--keep-checkpoints {cfg.keep_checkpoints} "
                    f"rotation of {checkpoint_bytes(cfg, ctx.data.vocab_size) / MB:.0f} MB checkpoints, "
                    "its final model, the session pack); not started. Raise --max-disk-gb, or lower "
                    "--keep-checkpoints or --keep-best-trials")
        if need > free:
            return (f"{budget}: trial {number} needs {need / GB:.2f} GB at its peak but the disk has only "
                    f"{free / GB:.2f} GB free; not started. Free some space, or lower --keep-checkpoints")
        return None

    def after_trial(self, ctx: StudyContext, outcome: TrialOutcome) -> None:
        """Remove what the study no longer needs once ``outcome``'s trial has ended."""
        if outcome.state == "interrupted":
            return                          # to be continued: its newest checkpoint is needed
        removed = remove_checkpoints(ctx, outcome.number, outcome.run_id)
        for number, run_id in self._beyond_best(ctx):
            removed += remove_tree(ctx, run_id, ctx.trial_dir(number) / "final_model",
                                   f"not among the {self.keep_best} best trials")
        ctx.log(f"disk: removed {removed / MB:.1f} MB after trial {outcome.number}; the study's files take "
                f"{study_bytes(ctx) / GB:.3f} GB of --max-disk-gb {self.max_bytes / GB:g}")

    def sweep(self, ctx: StudyContext) -> None:
        """Finish what a clean-up killed mid-way left: the files of finished trials that
        ``after_trial`` would have removed, and folders it had begun to remove."""
        run_ids = {ctx.trial_dir(t.number).name: t.user_attrs.get(RUN_ID_ATTR)
                   for t in ctx.study.get_trials(deepcopy=False)}
        removed = sum(remove_tree(ctx, run_ids.get(trash.parent.name), trash, "an earlier clean-up was interrupted")
                      for trash in sorted(ctx.out_dir.glob(f"trial-*/{TRASH_PREFIX}*")) if _abandoned(trash))
        for trial in ctx.study.get_trials(deepcopy=False, states=FINISHED):
            if (ctx.trial_dir(trial.number) / "checkpoints").exists():
                removed += remove_checkpoints(ctx, trial.number, trial.user_attrs.get(RUN_ID_ATTR))
        for number, run_id in self._beyond_best(ctx):
            removed += remove_tree(ctx, run_id, ctx.trial_dir(number) / "final_model",
                                   f"not among the {self.keep_best} best trials")
        if removed:
            ctx.log(f"disk: removed {removed / MB:.1f} MB that an interrupted clean-up left")

    def _beyond_best(self, ctx: StudyContext) -> list[tuple[int, int | None]]:
        done = ctx.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        ranked = sorted(done, key=lambda t: (t.value, t.number))
        return [(t.number, t.user_attrs.get(RUN_ID_ATTR)) for t in ranked[self.keep_best:]]


def remove_checkpoints(ctx: StudyContext, number: int, run_id: int | None) -> int:
    """A finished trial's checkpoints (never resumed again): files gone, rows flagged deleted."""
    folder = ctx.trial_dir(number) / "checkpoints"
    if run_id is not None:
        for stored in ctx.db.checkpoints(run_id).query("deleted == False").path:
            path = ctx.db.resolve_path(stored)
            if _inside(path, folder):
                ctx.db.mark_checkpoint_deleted(run_id, stored)
    return remove_tree(ctx, run_id, folder, "the trial has ended")


def remove_tree(ctx: StudyContext, run_id: int | None, path: Path, why: str) -> int:
    """Delete ``path`` if it is under the study's own folder; record it; return the bytes freed.

    It is first renamed aside (one atomic step: another worker's clean-up of the same folder
    finds nothing), then deleted; a kill in between leaves only the renamed folder, which
    the next ``sweep`` deletes."""
    if not path.exists() or not _inside(path, ctx.out_dir):
        return 0
    trash = path if path.name.startswith(TRASH_PREFIX) else \
        path.with_name(f"{TRASH_PREFIX}{path.name}-{os.getpid()}-{threading.get_ident()}")
    try:
        os.replace(path, trash)
    except FileNotFoundError:
        return 0            # another worker removed it first
    size = tree_bytes(trash)
    pause_point("disk.removing")
    shutil.rmtree(trash, ignore_errors=True)
    if run_id is not None:
        ctx.db.add_event(run_id, EVENT_FILES_REMOVED, None, {"paths": [str(path)], "bytes": size, "why": why})
    return size


def checkpoint_bytes(cfg: TrainConfig, vocab_size: int) -> int:
    """One checkpoint: fp32 weights, plus AdamW's two fp32 moments when saved (12 bytes a parameter)."""
    per_param = 12 if cfg.save_optimizer_state else 4
    return int(gpt2_parameters(cfg, vocab_size) * per_param * 1.01) + 64_000   # + RNG, state, manifest


def trial_peak_bytes(cfg: TrainConfig, vocab_size: int) -> int:
    final_model = gpt2_parameters(cfg, vocab_size) * 4
    return (cfg.keep_checkpoints + ROTATION_EXTRA) * checkpoint_bytes(cfg, vocab_size) + final_model


def pack_bytes(ctx: StudyContext, cfg: TrainConfig) -> int:
    """The session pack at the end: the database, one checkpoint in flight, the best final model."""
    one = checkpoint_bytes(cfg, ctx.data.vocab_size) + gpt2_parameters(cfg, ctx.data.vocab_size) * 4
    return PACK_COPIES * (one + _database_bytes(ctx))


def gpt2_parameters(cfg: TrainConfig, vocab_size: int) -> int:
    """GPT-2's parameter count, embeddings tied: tests check it against the built model."""
    e = cfg.n_embd
    per_layer = 12 * e * e + 13 * e       # attention 4 e^2 + 4 e, MLP 8 e^2 + 5 e, two layer norms 4 e
    return vocab_size * e + cfg.block_size * e + cfg.n_layer * per_layer + 2 * e


def study_bytes(ctx: StudyContext) -> int:
    """What the budget counts: the study's folder, the database and the session pack."""
    from trainer.pack import pack_paths

    files = [ctx.out_dir, *pack_paths(ctx.workdir)]
    return sum(tree_bytes(p) for p in files) + _database_bytes(ctx)


def tree_bytes(path: Path) -> int:
    if not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def _database_bytes(ctx: StudyContext) -> int:
    root = ctx.db.root
    if root is None:
        return 0
    main = Path(ctx.db.where)
    return sum(tree_bytes(Path(f"{main}{suffix}")) for suffix in ("", "-wal", "-shm"))


def _params_of(ctx: StudyContext, number: int) -> dict[str, Any]:
    trial = ctx.study.get_trials(deepcopy=False)[number]
    params = dict(trial.params)
    if "micro_batch" in params and "grad_accum" not in params:
        params["grad_accum"] = max(1, ctx.base.effective_batch // params["micro_batch"])
    return params


def _abandoned(trash: Path) -> bool:
    """Is ``trash`` left by a process that is gone (not one deleting it right now)?"""
    try:
        pid, thread = (int(part) for part in trash.name.rsplit("-", 2)[1:])
    except ValueError:
        return True
    if pid == os.getpid():      # a worker thread of this process that is deleting it now?
        return thread not in {t.ident for t in threading.enumerate()}
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False        # alive, another user's
    return False


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path

"""Mirrors of every run in the trackers people already open: TensorBoard and Weights & Biases.

    from expdb.mirrors import MirroredRecorder, check_report_to, mirrors_for
    for warning in check_report_to("wandb,tensorboard", cfg.out_dir):   # before any data work
        print(warning)
    recorder = MirroredRecorder(db.recorder(), mirrors_for("wandb,tensorboard", cfg.out_dir),
                                lookup=db.run)
    replay(db, [3, 4], to="tensorboard")                                 # runs already recorded

The database stays the source of truth: it is written on the training thread exactly as
without mirrors; each mirror runs on a thread of its own and a failing one is switched off
with one warning and one ``mirror_failed`` event. The packages (tensorboard, wandb) are
imported only when a mirror opens.
"""
from expdb.mirrors.base import (EVENT_MIRROR_FAILED, EVENT_MIRROR_LAGGED, CheckpointRef, Mirror, MirrorError,
                                MirrorRun, RunEnd)
from expdb.mirrors.factory import (REPORT_TO_CHOICES, check_report_to, is_main_process, mirrored, mirrors_for,
                                   parse_report_to)
from expdb.mirrors.fanout import MirroredRecorder, MirrorWarning
from expdb.mirrors.replay import replay
from expdb.mirrors.tensorboard import TensorBoardMirror
from expdb.mirrors.wandb import WandbMirror, wandb_run_id
from expdb.mirrors.wandb_offline import OfflineRun, offline_fragments, read_offline_run

__all__ = [
    "MirroredRecorder", "MirrorWarning", "mirrored", "mirrors_for", "check_report_to", "parse_report_to", "is_main_process",
    "REPORT_TO_CHOICES", "replay", "TensorBoardMirror", "WandbMirror", "wandb_run_id", "Mirror", "MirrorRun",
    "RunEnd", "CheckpointRef", "MirrorError", "EVENT_MIRROR_FAILED", "EVENT_MIRROR_LAGGED",
    "OfflineRun", "offline_fragments", "read_offline_run",
]

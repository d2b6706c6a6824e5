"""``--report-to wandb,tensorboard`` into mirror objects, and the check to run before any data work.

Names are checked first (a typo fails at once, naming the flag, the value and the
choices); ``check_report_to`` then looks for what would switch a mirror off later - the
package missing, a folder that cannot be written, W&B without credentials - and returns
warnings, never raises: a mirror is a convenience, the run goes on without it.
"""
from __future__ import annotations

import importlib.util
import netrc
import os
import shutil
from pathlib import Path
from typing import Sequence

from expdb.mirrors.base import Mirror
from expdb.mirrors.fanout import MirroredRecorder, warn_once
from expdb.mirrors.tensorboard import INSTALL_FIX as TB_INSTALL_FIX
from expdb.mirrors.tensorboard import SUBDIR as TB_SUBDIR
from expdb.mirrors.tensorboard import TensorBoardMirror
from expdb.mirrors.wandb import INSTALL_FIX as WANDB_INSTALL_FIX
from expdb.mirrors.wandb import LOGIN_FIX, WandbMirror, offline_mode
from trainer.errors import ConfigError
from trainer.recorder import REPORT_TO_CHOICES

LOW_DISK_BYTES = 200 * 1024 ** 2       # below this, event files and W&B logs may fill the disk


def parse_report_to(value: str | Sequence[str] | None) -> list[str]:
    """The mirrors named, in order, without "none"; unknown names raise one ConfigError."""
    if value is None:
        return []
    parts = value.split(",") if isinstance(value, str) else [p for v in value for p in str(v).split(",")]
    names = [p.strip().lower() for p in parts if p.strip()]
    unknown = [n for n in names if n not in REPORT_TO_CHOICES]
    if unknown:
        raise ConfigError([f"--report-to {','.join(names)}: unknown tracker {', '.join(map(repr, unknown))}; "
                           f"choose from {', '.join(REPORT_TO_CHOICES)} (comma-separated, e.g. "
                           "--report-to wandb,tensorboard)"])
    if "none" in names and len(names) > 1:
        raise ConfigError([f"--report-to {','.join(names)}: 'none' cannot be combined with a tracker"])
    return list(dict.fromkeys(n for n in names if n != "none"))


def is_main_process(rank: int | None = None) -> bool:
    """Only rank 0 reports under torchrun (RANK is set by the launcher)."""
    return (int(os.environ.get("RANK", "0")) if rank is None else rank) == 0


def mirrors_for(report_to: str | Sequence[str] | None, run_out_dir: str | Path | None = None,
                project: str | None = None, *, entity: str | None = None,
                hparam_names: list[str] | None = None, rank: int | None = None,
                rewind: bool = False) -> list[Mirror]:
    """The mirror objects for ``--report-to``; none on ranks other than 0.

    ``run_out_dir`` None: each mirror writes below the out_dir the run reports in its config.
    """
    names = parse_report_to(report_to)
    if not is_main_process(rank):
        return []
    base = Path(run_out_dir) if run_out_dir is not None else None
    built: list[Mirror] = []
    for name in names:
        if name == "tensorboard":
            built.append(TensorBoardMirror(base / TB_SUBDIR if base else None, hparam_names))
        elif name == "wandb":
            built.append(WandbMirror(project, entity, rewind=rewind, wandb_dir=base))
    return built


def mirrored(db, recorder, report_to: str | Sequence[str] | None, run_out_dir: str | Path | None = None,
             project: str | None = None, *, hparam_names: list[str] | None = None, warn=warn_once):
    """``recorder`` (a DBRecorder of ``db``) with the ``--report-to`` mirrors around it, or as it is."""
    mirrors = mirrors_for(report_to, run_out_dir, project or None, hparam_names=hparam_names)
    return MirroredRecorder(recorder, mirrors, lookup=db.run, warn=warn) if mirrors else recorder


def check_report_to(report_to: str | Sequence[str] | None, run_out_dir: str | Path) -> list[str]:
    """Warnings about the named mirrors, cheap enough to run before any data preparation."""
    warnings: list[str] = []
    for name in parse_report_to(report_to):
        if name == "tensorboard":
            warnings += _package_missing("tensorboard", "tensorboard", TB_INSTALL_FIX)
            warnings += _folder_problems("tensorboard", Path(run_out_dir) / TB_SUBDIR)
        elif name == "wandb":
            warnings += _package_missing("wandb", "wandb", WANDB_INSTALL_FIX)
            warnings += _folder_problems("wandb", Path(run_out_dir) / "wandb")
            warnings += _wandb_credentials()
    return warnings


def _package_missing(mirror: str, module: str, fix: str) -> list[str]:
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    return [] if found else [f"--report-to {mirror}: the {module} package is not installed; {fix}"]


def _folder_problems(mirror: str, folder: Path) -> list[str]:
    existing = _nearest_existing(folder)
    if not os.access(existing, os.W_OK | os.X_OK):
        return [f"--report-to {mirror}: {folder} cannot be created ({existing} is not writable); "
                f"use a writable --out-dir, or drop {mirror} from --report-to"]
    free = shutil.disk_usage(existing).free
    if free < LOW_DISK_BYTES:
        return [f"--report-to {mirror}: only {free / 1024 ** 2:.0f} MB free under {existing}; "
                f"the mirror is switched off if the disk fills (training goes on)"]
    return []


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _wandb_credentials() -> list[str]:
    if offline_mode() or os.environ.get("WANDB_API_KEY"):
        return []
    try:
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
        if netrc.netrc().authenticators(host):
            return []
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        pass
    return [f"--report-to wandb: not logged in to W&B (no WANDB_API_KEY, no ~/.netrc entry); {LOGIN_FIX}"]

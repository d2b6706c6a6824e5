"""The experiment database as the trainer's command lines see it (``trainer.recorder.Database``).

The trainer imports no database code: ``python -m trainer``, ``python -m trainer.lr_find`` and
``python -m trainer.pack`` find this class through the entry-point group
``smallgpt_lab.databases`` (pyproject.toml), the way SQLAlchemy finds its dialects. Each
method is one thing those commands ask of a database; the database's own errors come back as
problem lines, or as the trainer's ``ConfigError``, so the trainer never needs expdb's types.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import expdb
from expdb.maintenance import relocate
from expdb.mirrors import check_report_to, mirrored
from trainer.errors import ConfigError
from trainer.recorder import Recorder


class TrainerDatabase:
    """expdb behind the trainer's ``Database`` protocol."""

    def problems(self, url: str | Path, *, create: bool, write: bool, shared: bool = False) -> list[str]:
        """What is wrong with recording into (``write``) or reading ``url``; [] when nothing."""
        try:
            expdb.check_database(url, create=create, write=write, shared=shared)
        except expdb.ExpdbError as exc:
            return [str(exc)]
        return []

    def recorder(self, url: str, *, report_to: str = "none", out_dir: str | Path | None = None,
                 wandb_project: str | None = None, warn: Callable[[str], None] = print) -> Recorder:
        """A recorder on ``url`` with the --report-to mirrors (W&B, TensorBoard) around it."""
        try:
            db = expdb.open(url)
        except expdb.ExpdbError as exc:
            raise ConfigError([str(exc)]) from exc
        return mirrored(db, db.recorder(), report_to, out_dir, wandb_project, warn=warn)

    def mirror_warnings(self, report_to: str, out_dir: str | Path) -> list[str]:
        """Why a --report-to tracker would not work (cheap: before any data is prepared)."""
        return check_report_to(report_to, out_dir)

    def merge(self, sources: list[Path], into: str) -> list[str]:
        """Merge each source database into ``into`` (idempotent); one summary line per source."""
        return [report.summary() for report in expdb.merge(sources, into=into)] if sources else []

    def point_at_pack(self, snapshot: Path, out_dir: Path, held: dict[str, str]) -> None:
        """In a session pack's snapshot: the run of ``out_dir`` and the checkpoints the pack holds
        (absolute path -> path in the pack) point into the pack; every other checkpoint is flagged
        as not there."""
        with expdb.open(snapshot) as snap:
            moves = {int(r.id): held.get(str(snap.resolve_path(r.path).resolve()))
                     for r in snap.checkpoints().itertuples()}
            runs = {int(r.id): "run" for r in snap.runs().itertuples()
                    if r.out_dir and snap.resolve_path(r.out_dir).resolve() == out_dir.resolve()}
            relocate(snap, moves, runs)

"""The TensorBoard mirror: event files under ``<out_dir>/tensorboard/``.

Written through ``torch.utils.tensorboard.SummaryWriter`` (it needs the ``tensorboard``
package). A resume opens the writer with ``purge_step=resume_step + 1``: TensorBoard's
reader then hides every earlier event at that step or later, so the steps the resumed run
logs again are shown once, from the resumed run. Every scalar is drawn at the optimizer
step (epoch summaries too), because the purge works on steps.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from expdb.mirrors.base import (CheckpointRef, MirrorRun, RunEnd, epoch_scalars, epoch_step, eval_scalars,
                                storage_fix, train_scalars)
from trainer.files import json_safe

SUBDIR = "tensorboard"
INSTALL_FIX = "pip install tensorboard (or pip install 'smallgpt-lab[tensorboard]'), or drop tensorboard from --report-to"


class TensorBoardMirror:
    name = "tensorboard"

    def __init__(self, log_dir: str | Path | None = None, hparam_names: list[str] | None = None,
                 flush_secs: int = 30):
        """``log_dir`` defaults to ``<run out_dir>/tensorboard``. ``hparam_names``: the config
        keys shown in the HParams view (a study's searched parameters); None: every scalar
        config value, for a study's trials only."""
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.hparam_names, self._flush_secs = hparam_names, flush_secs
        self._writer: Any = None
        self._run: MirrorRun | None = None
        self._step = 0

    def open(self, run: MirrorRun) -> None:
        from torch.utils.tensorboard import SummaryWriter     # ImportError without tensorboard

        self._run = run
        self.log_dir = self.log_dir or Path(run.out_dir) / SUBDIR
        purge = run.resume_step + 1 if run.resumed else None
        self._writer = SummaryWriter(str(self.log_dir), purge_step=purge, flush_secs=self._flush_secs)
        self._step = purge or 0
        # The config again on a resume, at its first step: it may differ (micro-batch, host).
        self._writer.add_text("config", _code(run.info.config), self._step)
        self._writer.add_text("run", _code(_describe(run)), self._step)

    def step(self, step: int, metrics: Mapping[str, Any]) -> None:
        self._step = step
        self._scalars(train_scalars(metrics), step)

    def eval(self, step: int, epoch: int, metrics: Mapping[str, Any]) -> None:
        self._scalars(eval_scalars(metrics), step)

    def epoch(self, epoch: int, metrics: Mapping[str, Any]) -> None:
        self._scalars(epoch_scalars(epoch, metrics), epoch_step(epoch, metrics, self._step))

    def checkpoint(self, ref: CheckpointRef) -> None:
        self._writer.add_text("checkpoints", _code(ref.__dict__), ref.step)

    def event(self, kind: str, step: int | None, detail: Mapping[str, Any]) -> None:
        self._writer.add_text(f"events/{kind}", _code(detail), self._step if step is None else step)

    def close(self, end: RunEnd) -> None:
        step = end.last_step if end.last_step is not None else self._step
        self._writer.add_text("status", f"{end.status}: {end.reason}" if end.reason else end.status, step)
        if self._wants_hparams():
            self._write_hparams(end, step)
        self._writer.close()
        self._writer = None

    def abandon(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.close()
            except Exception:           # noqa: BLE001 - the mirror has already failed
                pass

    def fix_for(self, exc: BaseException) -> str:
        if isinstance(exc, ImportError):
            return INSTALL_FIX
        return storage_fix(exc, f"TensorBoard's folder {self.log_dir}") or "see the error, or drop tensorboard from --report-to"

    # -- helpers -------------------------------------------------------------------------
    def _scalars(self, values: dict[str, float], step: int) -> None:
        """One event holding every scalar of the step: add_scalar would write (and serialise,
        and hold the GIL for) one event per tag, about five times the work."""
        from tensorboard.compat.proto.summary_pb2 import Summary

        if values:
            summary = Summary(value=[Summary.Value(tag=tag, simple_value=value) for tag, value in values.items()])
            self._writer.file_writer.add_summary(summary, step)

    def _wants_hparams(self) -> bool:
        return self.hparam_names is not None or self._run.info.study_name is not None

    def _write_hparams(self, end: RunEnd, step: int) -> None:
        """The HParams view in this run's own event file (SummaryWriter.add_hparams would make
        a sub-run per call); its metrics are the scalars tagged hparam/*."""
        from torch.utils.tensorboard.summary import hparams

        params = hparam_values(self._run.info.config, self.hparam_names)
        metrics = {f"hparam/{k}": v for k, v in (("best_val_loss", end.best_val_loss),
                                                 ("best_val_bpb", end.best_val_bpb),
                                                 ("final_val_loss", end.final_val_loss)) if v is not None}
        for summary in hparams(params, metrics):
            self._writer.file_writer.add_summary(summary)
        self._scalars(metrics, step)


def hparam_values(config: Mapping[str, Any], names: list[str] | None) -> dict[str, Any]:
    """The values the HParams view can show (numbers, strings, bools); None becomes "None"."""
    chosen = config if names is None else {k: config.get(k) for k in names}
    values = {}
    for key, value in chosen.items():
        if value is None:
            values[key] = "None"
        elif isinstance(value, (bool, int, float, str)):
            values[key] = value
    return values


def _describe(run: MirrorRun) -> dict[str, Any]:
    info = run.info
    return {"run_id": run.run_id, "uid": run.uid, "name": info.name, "study": info.study_name,
            "trial": info.trial_number, "resume_step": run.resume_step, "device": info.device,
            "precision": info.precision, "host": info.host, "n_params": info.n_params}


def _code(obj: Any) -> str:
    # Markdown: TensorBoard's text plugin renders it, so JSON is indented in a code block.
    return "```\n" + json.dumps(json_safe(obj), indent=1, sort_keys=True, default=str) + "\n```"

"""The Weights & Biases mirror: one W&B run per database run, continued across resumes.

The W&B run id is the run row's ``uid`` (a uuid4 hex, kept by resumes and merges), so a
resumed run - same folder, a later Kaggle session, a merged database - calls
``wandb.init(id=uid, resume="allow")`` and continues the same W&B run.

W&B drops a logged step lower than the last one it has, so the steps a resume replaces
cannot be redrawn; this mirror skips, instead of sending, every step the W&B run already
holds: online, those below ``run.step`` (what the server reports on resume); offline,
where wandb cannot ask the server and starts a new local fragment
``offline-run-<time>-<id>-N`` with the same id, those up to the last step of the earlier
fragments in this folder (read back by ``wandb_offline``). The chart keeps the first
session's values for those steps: identical for an exact resume, the first session's
where the resumed one differed (the database has the resumed ones). ``rewind=True`` uses
W&B's ``resume_from="<id>?_step=<resume_step + 1>"`` instead (online only; a private
preview on W&B's side): the server truncates the history and the resumed values are drawn.

Checkpoints are references (path, size, sha256) in the summary, never uploaded.
"""
from __future__ import annotations

import os
import re
import uuid
from pathlib import Path
from typing import Any, Mapping

from expdb.mirrors import wandb_offline
from expdb.mirrors.base import (CheckpointRef, MirrorRun, RunEnd, epoch_scalars, epoch_step, eval_scalars,
                                storage_fix, train_scalars)
from trainer.files import json_safe

INSTALL_FIX = "pip install wandb (or pip install 'smallgpt-lab[wandb]'), or drop wandb from --report-to"
LOGIN_FIX = ("run `wandb login` (or set WANDB_API_KEY), or set WANDB_MODE=offline and `wandb sync` "
             "the folder later")
_BAD_PROJECT_CHARS = re.compile(r"[/\\#?%:]+")


def wandb_run_id(run: MirrorRun) -> str:
    """The W&B id of a database run: its uid; without one (a recorder that has none), a
    name derived from the run's folder and name, stable across sessions of that folder."""
    if run.uid:
        return run.uid
    return uuid.uuid5(uuid.NAMESPACE_URL, f"expdb-run:{run.out_dir}:{run.info.name}").hex


def project_name(run: MirrorRun, project: str | None) -> str:
    name = project or run.info.study_name or run.info.name
    return _BAD_PROJECT_CHARS.sub("-", name).strip("-") or "smallgpt"


def display_name(run: MirrorRun) -> str:
    info = run.info
    return f"trial-{info.trial_number}" if info.trial_number is not None else info.name


class WandbMirror:
    name = "wandb"

    def __init__(self, project: str | None = None, entity: str | None = None, *, rewind: bool = False,
                 wandb_dir: str | Path | None = None, settings: Mapping[str, Any] | None = None):
        """``wandb_dir`` defaults to the run's out_dir (W&B adds ``wandb/`` below it)."""
        self.project, self.entity, self.rewind = project, entity, rewind
        self.wandb_dir = Path(wandb_dir) if wandb_dir is not None else None
        # console="off": W&B must not wrap the trainer's stdout; the database keeps the log.
        self._settings = {"console": "off", "silent": True, **(settings or {})}
        self._run: Any = None
        self._skip_through = -1         # steps up to this one are already in the W&B run
        self._step = 0
        self.checkpoints: list[dict[str, Any]] = []
        self.events: list[list[Any]] = []

    # -- Mirror --------------------------------------------------------------------------
    def open(self, run: MirrorRun) -> None:
        import wandb        # ImportError without wandb

        # Absolute: a wandb-core service shared with another process resolves relative paths from its own cwd.
        self.wandb_dir = (self.wandb_dir or Path(run.out_dir)).absolute()
        self.wandb_dir.mkdir(parents=True, exist_ok=True)
        run_id = wandb_run_id(run)
        earlier = wandb_offline.offline_fragments(self.wandb_dir, run_id)     # before init adds its own
        args = self._init_args(wandb, run, run_id)
        self._run = wandb.init(**args)
        # Rewound: the server cut the history after resume_step, so everything after it is sent.
        self._skip_through = run.resume_step if "resume_from" in args else self._already_logged(earlier)

    def step(self, step: int, metrics: Mapping[str, Any]) -> None:
        self._step = step
        self._log(train_scalars(metrics), step)

    def eval(self, step: int, epoch: int, metrics: Mapping[str, Any]) -> None:
        self._log(eval_scalars(metrics), step)

    def epoch(self, epoch: int, metrics: Mapping[str, Any]) -> None:
        self._log(epoch_scalars(epoch, metrics), epoch_step(epoch, metrics, self._step))

    def checkpoint(self, ref: CheckpointRef) -> None:
        record = json_safe(dict(ref.__dict__))
        self.checkpoints.append(record)
        self._run.summary[f"checkpoint/{ref.kind}"] = record     # the latest of each kind

    def event(self, kind: str, step: int | None, detail: Mapping[str, Any]) -> None:
        self.events.append([step, kind, json_safe(dict(detail))])
        self._run.summary[f"events/{kind}"] = sum(1 for e in self.events if e[1] == kind)

    def close(self, end: RunEnd) -> None:
        import wandb

        summary = self._run.summary
        summary.update(json_safe({"status": end.status, "status_reason": end.reason,
                                  "best_val_loss": end.best_val_loss, "best_step": end.best_step,
                                  "best_val_bpb": end.best_val_bpb, "final_val_loss": end.final_val_loss}))
        if self.checkpoints:
            summary["checkpoints"] = wandb.Table(
                columns=list(self.checkpoints[0]), data=[list(c.values()) for c in self.checkpoints])
        if self.events:
            summary["events"] = wandb.Table(columns=["step", "kind", "detail"],
                                            data=[[s, k, str(d)] for s, k, d in self.events])
        run, self._run = self._run, None
        run.finish(exit_code=0 if end.status in ("completed", "pruned") else 1)

    def abandon(self) -> None:
        run, self._run = self._run, None
        if run is not None:
            try:
                run.finish(exit_code=1)
            except Exception:           # noqa: BLE001 - the mirror has already failed
                pass

    def fix_for(self, exc: BaseException) -> str:
        if isinstance(exc, ImportError):
            return INSTALL_FIX
        found = storage_fix(exc, f"W&B's folder {self.wandb_dir}/wandb")
        if found:
            return found
        text = f"{type(exc).__name__} {exc}".lower()     # wandb.errors.AuthenticationError, UsageError, CommError
        if any(word in text for word in ("api key", "api_key", "login", "auth", "401", "403")):
            return LOGIN_FIX
        if any(word in text for word in ("commerror", "network", "connect", "timed out", "timeout", "resolve")):
            return ("check the network, or set WANDB_MODE=offline and `wandb sync` the folder later "
                    "(or `python -m expdb export --to wandb RUN` once online)")
        return "see the error, or set WANDB_MODE=offline, or drop wandb from --report-to"

    # -- helpers -------------------------------------------------------------------------
    def _init_args(self, wandb: Any, run: MirrorRun, run_id: str) -> dict[str, Any]:
        args = dict(project=project_name(run, self.project), entity=self.entity, name=display_name(run),
                    group=run.info.study_name, config=json_safe(run.info.config), dir=str(self.wandb_dir),
                    reinit="create_new",        # a study's worker threads run several trials at once
                    settings=wandb.Settings(**self._settings))
        if self.rewind and run.resumed and not offline_mode():
            args["resume_from"] = f"{run_id}?_step={run.resume_step + 1}"
        else:
            args.update(id=run_id, resume="allow")
        return args

    def _already_logged(self, earlier: list[Path]) -> int:
        """The last step this W&B run already holds, which this session must not send again:
        the server's (online, ``run.step`` is the next step it accepts) or that of the earlier
        offline fragments in this folder, whichever is later."""
        online = self._run.step - 1 if getattr(self._run, "resumed", False) else -1
        return max(online, wandb_offline.last_step(earlier))

    def _log(self, values: dict[str, float], step: int) -> None:
        if step > self._skip_through and values:
            self._run.log(values, step=step)


def offline_mode() -> bool:
    """W&B writes locally only (WANDB_MODE=offline): nothing to ask a server."""
    return os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun", "disabled")

"""The learning-rate range test (Leslie Smith, 2015; fastai's ``lr_find``).

    python -m trainer.lr_find --preset quick --out runs/lr-find [--min-lr 1e-6 --max-lr 1 --steps 200]

From the run's own initial weights (the model ``--seed`` builds) the learning rate rises
exponentially from --min-lr to --max-lr, one optimizer step per value, on the run's own
batches; the test stops early once the smoothed loss diverges (over DIVERGE_FACTOR x its
best so far, or not finite). It writes ``lr_find.json`` (the curve and the suggestion) and
``lr_find.png`` into --out, records a run named ``lr_find:<name>`` in the database with an
``lr_find`` event (the database has no run "kind": the name's prefix and the event mark it),
prints the suggestion and the flag to train with, and writes no checkpoint.

The suggestion is the steepest descent of the smoothed loss (the most negative slope against
log lr, before its minimum): where a step of the learning rate buys the most loss, the
largest rate that still trains steadily. The minimum / 10 rule is recorded beside it; it
is the fallback when the curve is too short to have a slope. ``lr_range`` turns a finder's
folder into a search range for a study.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from trainer.config import TrainConfig
from trainer.errors import ConfigError

RESULT_FILE, PLOT_FILE = "lr_find.json", "lr_find.png"
RUN_PREFIX = "lr_find:"          # the run's name in the database: lr_find:<run name>
DIVERGE_FACTOR = 4.0             # the smoothed loss past this multiple of its best: diverged
SMOOTHING = 0.9                  # EMA weight of the past (a ~10-step window, bias-corrected)
STEEPEST, MINIMUM_TENTH = "steepest", "minimum/10"


@dataclass(frozen=True)
class FinderSettings:
    min_lr: float = 1e-6
    max_lr: float = 1.0
    steps: int = 200

    def lr_at(self, i: int) -> float:
        """The i-th (0-based) learning rate: exponential from min_lr to max_lr over ``steps``."""
        return self.min_lr * (self.max_lr / self.min_lr) ** (i / max(self.steps - 1, 1))

    def problems(self) -> list[str]:
        p = []
        for name in ("min_lr", "max_lr"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                p.append(f"--{name.replace('_', '-')} {value!r}: use a positive learning rate such as 1e-6")
        if not p and self.max_lr <= self.min_lr:
            p.append(f"--max-lr {self.max_lr!r}: must be above --min-lr {self.min_lr!r}; e.g. --min-lr 1e-6 --max-lr 1")
        if not (isinstance(self.steps, int) and 10 <= self.steps <= 100_000):
            p.append(f"--steps {self.steps!r}: use 10..100000 optimizer steps (a few hundred is usual)")
        return p


class Curve(NamedTuple):
    """What the range test measured, one entry per optimizer step taken."""

    lrs: tuple[float, ...]
    losses: tuple[float, ...]
    smoothed: tuple[float, ...]
    stopped: str                 # why the test ended


class Suggestion(NamedTuple):
    lr: float
    rule: str                    # STEEPEST or MINIMUM_TENTH
    steepest_lr: float | None    # None when the curve is too short for a slope
    minimum_lr: float            # the lr at the smoothed loss's minimum


# -- the measurement ---------------------------------------------------------------------------
def diverged(smoothed: list[float]) -> bool:
    last = smoothed[-1]
    return not math.isfinite(last) or last > DIVERGE_FACTOR * min(smoothed)


def range_test(model, cfg: TrainConfig, data, placement, settings: FinderSettings,
               on_step: Callable[[int, float, float], None] = lambda *_: None) -> Curve:
    """Train ``model`` (fresh from ``cfg``'s seed) with the rising learning rate; the curve.

    ``on_step(step, lr, loss)`` is told each step (the database's step metrics).
    """
    from trainer.data.batches import PackedBlocks
    from trainer.model import build_optimizer

    blocks = PackedBlocks(data.train, cfg.block_size)
    optimizer, scaler = build_optimizer(model, cfg), placement.grad_scaler()
    lrs, losses, smoothed, avg = [], [], [], 0.0
    stopped = f"reached --max-lr {settings.max_lr:g}"
    for i in range(settings.steps):
        lr = settings.lr_at(i)
        loss = _step(model, optimizer, scaler, blocks, _batch_ids(blocks, cfg, i), cfg, placement, lr)
        avg = SMOOTHING * avg + (1 - SMOOTHING) * loss      # bias-corrected: early values not pulled to 0
        lrs.append(lr), losses.append(loss)
        smoothed.append(avg / (1 - SMOOTHING ** (i + 1)) if math.isfinite(loss) else math.inf)
        on_step(i + 1, lr, loss)
        if diverged(smoothed):
            stopped = f"diverged at step {i + 1} (lr {lr:.3g}): smoothed loss over {DIVERGE_FACTOR:g}x its best"
            break
    return Curve(tuple(lrs), tuple(losses), tuple(smoothed), stopped)


def _batch_ids(blocks, cfg: TrainConfig, i: int) -> np.ndarray:
    """The i-th optimizer step's sequences in the run's own data order (epochs wrap around)."""
    from trainer.batching import Batching

    batching = Batching.from_config(cfg)
    epoch, k = divmod(i, batching.steps_per_epoch(len(blocks)))
    return blocks.epoch_order(cfg.seed, epoch)[k * batching.per_step:(k + 1) * batching.per_step]


def _step(model, optimizer, scaler, blocks, ids: np.ndarray, cfg: TrainConfig, placement, lr: float) -> float:
    """One optimizer step at ``lr``, the training loop's own (trainer.step.train_step); the step's mean loss."""
    from trainer.batching import Batching
    from trainer.model import next_token_loss
    from trainer.step import StepParts, train_step

    for group in optimizer.param_groups:     # Muon's --muon-lr keeps its ratio to the swept --lr
        group["lr"] = lr * (group["base_lr"] / cfg.lr)
    parts = StepParts(lambda micro: next_token_loss(model, blocks.get(micro).to(placement.device), placement.autocast),
                      model, optimizer, scaler, cfg.grad_clip, placement.device)
    return train_step(parts, Batching.from_config(cfg).micro_batches(ids), step=1).loss


# -- the suggestion ----------------------------------------------------------------------------
def suggest(curve: Curve) -> Suggestion:
    """Steepest descent of the smoothed loss before its minimum; minimum / 10 when too short.

    The first tenth of the curve is left out: the average has not settled there yet.
    """
    lrs, sm = np.array(curve.lrs), np.array(curve.smoothed)
    finite = np.isfinite(sm)
    lowest = int(np.argmin(np.where(finite, sm, np.inf)))
    minimum_lr = float(lrs[lowest])
    start = max(1, len(lrs) // 10)
    steepest_lr = None
    if lowest - start >= 3:
        slope = np.gradient(sm[:lowest + 1], np.log(lrs[:lowest + 1]))
        steepest_lr = float(lrs[start + int(np.argmin(slope[start:]))])
    if steepest_lr is None:
        return Suggestion(minimum_lr / 10, MINIMUM_TENTH, None, minimum_lr)
    return Suggestion(steepest_lr, STEEPEST, steepest_lr, minimum_lr)


def lr_range(finder_dir: str | Path, flag: str = "--lr-from-finder") -> tuple[float, float]:
    """A study's log-uniform lr range from a finder's folder: a decade centred on the suggestion,
    capped at the lr of the smoothed loss's minimum (past it the loss no longer falls).

    Raises ConfigError naming ``flag`` when the folder holds no finder result.
    """
    import json

    path = Path(finder_dir) / RESULT_FILE
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
        lr, minimum = float(result["suggested_lr"]), float(result["minimum_lr"])
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError([f"{flag} {str(finder_dir)!r}: no readable {RESULT_FILE} there; run "
                           f"python -m trainer.lr_find --out {finder_dir} first"]) from None
    high = min(lr * math.sqrt(10), max(minimum, lr))
    return lr / math.sqrt(10), high


# -- one finder run: the database, the files -----------------------------------------------------
class FinderResult(NamedTuple):
    run_id: int
    suggestion: Suggestion
    curve: Curve
    result_file: Path
    plot_file: Path


def find(cfg: TrainConfig, data, placement, settings: FinderSettings, recorder=None,
         log: Callable[[str], None] = print) -> FinderResult:
    """The range test of ``cfg`` recorded as a run; lr_find.json and lr_find.png in cfg.out_dir."""
    import socket

    from trainer.model import build_model, count_parameters
    from trainer.recorder import EVENT_LR_FIND, NullRecorder, RunInfo

    recorder = recorder or NullRecorder()
    model = build_model(cfg, data.vocab_size, data.tokenizer.eos_token_id).to(placement.device)
    out = Path(cfg.out_dir)
    run_id = recorder.start_run(RunInfo(
        name=RUN_PREFIX + (cfg.run_name or out.name), config=cfg.to_dict(), dataset=data.dataset_identity,
        tokenizer=data.tokenizer_identity, n_params=count_parameters(model), device=placement.description,
        precision=placement.precision, host=socket.gethostname(),
        extra={"kind": "lr_find", "min_lr": settings.min_lr, "max_lr": settings.max_lr, "steps": settings.steps}))
    try:
        curve = range_test(model, cfg, data, placement, settings,
                           on_step=lambda step, lr, loss: recorder.log_step(step, {"loss": loss, "lr": lr}))
        suggestion = suggest(curve)
        files = _write_outputs(out, cfg, settings, curve, suggestion, run_id)
    except BaseException as exc:
        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        recorder.finish(status, f"{type(exc).__name__}: {exc}")
        raise
    recorder.log_event(EVENT_LR_FIND, len(curve.lrs), {**_summary(cfg, settings, curve, suggestion),
                                                       "result": str(files[0]), "plot": str(files[1])})
    recorder.finish("completed", f"lr_find: suggested lr {suggestion.lr:.3g} ({suggestion.rule}); {curve.stopped}")
    log(f"lr_find: {len(curve.lrs)} steps from lr {settings.min_lr:g}; {curve.stopped}")
    return FinderResult(run_id, suggestion, curve, *files)


def _summary(cfg: TrainConfig, settings: FinderSettings, curve: Curve, s: Suggestion) -> dict:
    return {"suggested_lr": s.lr, "rule": s.rule, "steepest_lr": s.steepest_lr, "minimum_lr": s.minimum_lr,
            "config_lr": cfg.lr, "stopped": curve.stopped, "min_lr": settings.min_lr, "max_lr": settings.max_lr,
            "steps": settings.steps, "steps_taken": len(curve.lrs)}


def _write_outputs(out: Path, cfg: TrainConfig, settings: FinderSettings, curve: Curve, s: Suggestion,
                   run_id: int) -> tuple[Path, Path]:
    from trainer.files import atomic_write_json
    from trainer.lr_find_png import render

    out.mkdir(parents=True, exist_ok=True)
    result = {**_summary(cfg, settings, curve, s), "run_id": run_id, "config": cfg.to_dict(),
              "curve": {"lr": list(curve.lrs), "loss": list(curve.losses), "smoothed": list(curve.smoothed)}}
    plot = out / PLOT_FILE
    render(curve, s, cfg.lr, plot)
    return atomic_write_json(out / RESULT_FILE, result), plot


# -- the command line ----------------------------------------------------------------------------
PROG = "python -m trainer.lr_find"


def build_parser():
    from trainer.cli import Parser, add_config_flags

    p = Parser(prog=PROG, description="Learning-rate range test: the loss against an exponentially rising "
                                      "learning rate, with a suggested --lr.")
    p.add_argument("--out", required=True, metavar="DIR", help=f"Folder for {RESULT_FILE} and {PLOT_FILE}.")
    p.add_argument("--min-lr", type=float, default=FinderSettings.min_lr, help="First learning rate (default 1e-6).")
    p.add_argument("--max-lr", type=float, default=FinderSettings.max_lr, help="Last learning rate (default 1).")
    p.add_argument("--steps", type=int, default=FinderSettings.steps, help="Optimizer steps (default 200).")
    p.add_argument("--db", default="experiments.db", metavar="URL",
                   help="Experiment database: a SQLite path or a SQLAlchemy URL (default experiments.db).")
    p.add_argument("--no-db", action="store_true", help="Record nothing in a database.")
    add_config_flags(p, skip={"out_dir", "lr"})    # the finder chooses the lr; --out is its own
    return p


def main(argv: list[str] | None = None) -> int:
    from trainer.cli import collect_problems, config_from_args, environment_checks, fail, raise_problems
    from trainer.errors import TrainerError

    args = build_parser().parse_args(argv)
    settings = FinderSettings(args.min_lr, args.max_lr, args.steps)
    try:
        cfg = config_from_args(args, out_dir=args.out)
    except TrainerError as exc:
        fail(PROG, ConfigError(settings.problems() + (exc.problems if isinstance(exc, ConfigError) else [str(exc)])))
    problems = collect_problems(environment_checks(cfg) + [("", lambda: raise_problems(settings.problems()))])
    if not args.no_db:
        from trainer.cli import database_check
        problems += collect_problems([database_check(args.db)])
    if problems:
        fail(PROG, ConfigError(problems))
    return _run(cfg, settings, args)


def _run(cfg: TrainConfig, settings: FinderSettings, args) -> int:
    from trainer.cli import fail
    from trainer.data import prepare_data
    from trainer.device import place
    from trainer.recorder import find_database
    from trainer.errors import TrainerError

    try:
        data = prepare_data(cfg)       # the first write (the token cache), after every check passed
        placement = place(cfg)
        placement.apply()
        recorder = None if args.no_db else find_database().recorder(args.db)
        result = find(cfg, data, placement, settings, recorder)
    except TrainerError as exc:
        fail(PROG, exc)
    s = result.suggestion
    muon = f" --muon-lr {s.lr * cfg.muon_lr / cfg.lr:.3g}" if cfg.optimizer == "muon" else ""   # the same ratio
    print(f"suggested learning rate: {s.lr:.3g} ({s.rule} of the smoothed loss; minimum at {s.minimum_lr:.3g}); "
          f"the config's lr is {cfg.lr:g}\ntrain with: --lr {s.lr:.3g}{muon}\nplot: {result.plot_file}")
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(main())

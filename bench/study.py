"""Studies: optimizer steps saved by pruning, overhead per trial outside training, CLI start-up.

Each study is the real command, ``python -m studies.search``, on a tiny config and search
space, with the median pruner and with none, the same seed and a fresh database each; the
numbers are read back from the experiment database (steps, run durations) and the Optuna
storage in the same file (trial durations).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from bench.common import alternate, part, ratio, row, timed

ROOT = Path(os.path.abspath(__file__)).parent.parent
PROG = [sys.executable, "-m", "studies.search"]


@dataclass(frozen=True)
class Sizes:
    trials: int = 8
    subset: float = 0.01        # ~12,000 training tokens: 23 optimizer steps of 16 x 32 per epoch
    vocab_size: int = 512
    n_layer: int = 1
    n_embd: int = 32
    n_head: int = 2
    block_size: int = 32
    micro_batch: int = 16
    epochs: int = 3             # the median pruner waits for the first epoch to end
    eval_every: int = 6
    eval_batches: int = 2
    max_steps: int = 0
    help_runs: int = 5          # start-up time of --help: this many runs

    def config_yaml(self, cache_dir: str) -> str:
        keys = ("subset", "vocab_size", "n_layer", "n_embd", "n_head", "block_size", "micro_batch",
                "epochs", "eval_every", "eval_batches", "max_steps")
        lines = [f"{k}: {getattr(self, k)}" for k in keys]
        return "\n".join(lines + ["grad_accum: 1", "warmup_steps: 10", "progress: false",
                                  f"cache_dir: {cache_dir}"]) + "\n"


FULL = Sizes()
SMOKE = Sizes(trials=2, epochs=1, max_steps=6, eval_every=3, help_runs=2)

# A learning rate range wide enough that some trials are clearly worse than others:
# what a pruner is for.
SPACE = "lr 1e-4..3e-2 (log), weight_decay 0..0.2"
SPACE_YAML = """\
lr:           {type: float, low: 1.0e-4, high: 3.0e-2, log: true}
weight_decay: {type: float, low: 0.0, high: 0.2}
"""


def cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    # One thread: a 32-wide model spends more time synchronising threads than computing, and
    # this part counts steps and overheads, not speed.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run(PROG + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(PROG + args)} exited {result.returncode}:\n"
                           f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return result


def run_search(work: Path, sizes: Sizes, pruner: str, cache_dir: str) -> dict[str, Any]:
    """One study in a fresh directory; what it cost and found, from the database."""
    import expdb
    import optuna

    (work / "tiny.yaml").write_text(sizes.config_yaml(cache_dir))
    (work / "space.yaml").write_text(SPACE_YAML)
    flags = ["--trials", str(sizes.trials), "--study-name", "bench", "--db", "experiments.db", "--out", "runs",
             "--config", "tiny.yaml", "--space", "space.yaml", "--pruner", pruner, "--seed", "0",
             "--progress", "false"]
    start = time.perf_counter()
    cli(flags, work)
    wall = time.perf_counter() - start
    with expdb.open(work / "experiments.db", create=False) as db:
        runs = db.study("bench")
    trials = optuna.load_study(study_name="bench", storage=f"sqlite:///{work / 'experiments.db'}").get_trials()
    run_seconds = dict(zip(runs["trial_number"], runs["duration_s"]))
    in_trial = [t.duration.total_seconds() - run_seconds[t.number] for t in trials
                if t.duration and t.number in run_seconds]
    return {"steps": float(runs["n_steps"].sum()), "best_val_loss": float(runs["best_val_loss"].min()),
            "pruned": int((runs["status"] == "pruned").sum()), "wall_s": wall,
            "in_trial_overhead_s": in_trial,
            "command_overhead_per_trial_s": (wall - float(runs["duration_s"].sum())) / len(runs)}


def help_seconds(cwd: Path) -> float:
    return timed(lambda: cli(["--help"], cwd))


def run(repeats: int, smoke: bool, cache_dir: str, log: Callable[[str], None] = print) -> dict[str, Any]:
    sizes = SMOKE if smoke else FULL
    cache_dir = str(Path(cache_dir).resolve())
    work = Path(tempfile.mkdtemp(prefix="bench-study-"))
    outcomes: dict[str, list[dict[str, Any]]] = {"median": [], "none": []}
    try:
        def study(pruner: str) -> float:
            d = work / f"{pruner}-{len(outcomes[pruner])}"
            d.mkdir()
            outcomes[pruner].append(run_search(d, sizes, pruner, cache_dir))
            return outcomes[pruner][-1]["steps"]

        # Studies are long: one pair per round is enough to see the pruner's effect.
        alternate({"median": lambda: study("median"), "none": lambda: study("none")}, max(1, repeats // 3), log)
        start_up = alternate({"--help": lambda: help_seconds(work)}, sizes.help_runs, log)["--help"]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med, none = outcomes["median"], outcomes["none"]

    def col(runs: list[dict], key: str) -> list[float]:
        return [r[key] for r in runs]

    rows = [row("optimizer steps, median pruner", col(med, "steps"), "steps", higher_is_better=False),
            row("optimizer steps, no pruner", col(none, "steps"), "steps", higher_is_better=False),
            row("trials pruned, median pruner", col(med, "pruned"), "trials"),
            row("best val loss, median pruner", col(med, "best_val_loss"), "nats", higher_is_better=False),
            row("best val loss, no pruner", col(none, "best_val_loss"), "nats", higher_is_better=False),
            row("study wall time, median pruner", col(med, "wall_s"), "s", higher_is_better=False),
            row("study wall time, no pruner", col(none, "wall_s"), "s", higher_is_better=False),
            row("overhead per trial inside the trial", [x for r in med + none for x in r["in_trial_overhead_s"]], "s",
                higher_is_better=False,
                note="Optuna trial duration minus the run's duration; every trial; a command's first trial "
                     "also imports torch"),
            row("overhead per trial, whole command", col(med + none, "command_overhead_per_trial_s"), "s",
                higher_is_better=False, note="(command wall time - sum of run durations) / trials"),
            row("`python -m studies.search --help`", start_up, "s", higher_is_better=False)]
    return part(
        "Studies", settings={**asdict(sizes), "space": SPACE},
        method=("`python -m studies.search` with `--pruner median` and `--pruner none`, same seed, fresh "
                "database each, alternating, with OMP_NUM_THREADS=1 (a tiny model); steps = sum over the "
                "study's runs of their recorded steps; "
                "a run's duration is started_at to ended_at in expdb (set-up before start_run, the "
                "sampler and Optuna's bookkeeping fall outside it)"),
        rows=rows,
        ratios=[ratio("steps with median pruner / without", col(med, "steps"), col(none, "steps")),
                ratio("wall time with median pruner / without", col(med, "wall_s"), col(none, "wall_s")),
                ratio("best val loss with median pruner / without", col(med, "best_val_loss"),
                      col(none, "best_val_loss"))],
        repeats=max(1, repeats // 3), smoke=smoke)

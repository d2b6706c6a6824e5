"""Mirrors: what TensorBoard and W&B cost the training thread, beside the database recorder alone.

Each contender records one run into a fresh SQLite file: DBRecorder alone, or wrapped in
a MirroredRecorder with TensorBoard, W&B (offline) or both. Two figures per round:
- the training thread's time per ``log_step`` call (the mirrors' own writes happen on
  their threads, so this is the queue hand-off);
- steps per second of a loop that does ~1 ms of torch work per step, then logs: the
  mirror threads still take CPU and the GIL, and this is where that would show.
The W&B/TensorBoard start-up (import, ``wandb.init``) is on the mirror's thread, inside
the timed loop, as it is in training; ``finish`` (the drain) is timed apart.
"""
from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from bench.common import alternate, part, ratio, row
from bench.metric_logging import step_metrics

CONTENDERS = {"expdb alone": "", "expdb + tensorboard": "tensorboard", "expdb + wandb": "wandb",
              "expdb + both": "wandb,tensorboard"}


@dataclass(frozen=True)
class Sizes:
    steps: int = 2000
    work_matmul: int = 192          # a work x work matmul + tanh per step, work_repeats times:
    work_repeats: int = 2           # ~1 ms on one core of a 2020s CPU


FULL = Sizes()
SMOKE = Sizes(steps=100, work_repeats=1)


def run_info(out_dir: Path):
    from trainer.recorder import RunInfo
    return RunInfo(name="bench-mirrors", config={"lr": 1e-3, "out_dir": str(out_dir)}, dataset={"source": "bench"},
                   tokenizer={"kind": "bpe"}, n_params=1, device="cpu", precision="fp32", host="bench")


def one_run(report_to: str, sizes: Sizes, results: dict[str, list[float]]) -> float:
    """One recorded run; appends its figures to ``results``; returns steps/s of the loop."""
    import torch

    import expdb
    from expdb.mirrors import MirroredRecorder, mirrors_for

    work = Path(tempfile.mkdtemp(prefix="bench-mirrors-"))
    a = torch.randn(sizes.work_matmul, sizes.work_matmul)
    warnings: list[str] = []
    try:
        with expdb.open(work / "expdb.db") as db:
            rec: Any = db.recorder()
            if report_to:
                rec = MirroredRecorder(rec, mirrors_for(report_to, work / "run"), lookup=db.run, warn=warnings.append)
            rec.start_run(run_info(work / "run"))
            calls: list[float] = []
            start = time.perf_counter()
            for step in range(1, sizes.steps + 1):
                for _ in range(sizes.work_repeats):
                    a = torch.tanh(a @ a)           # the "training step"
                t0 = time.perf_counter()
                rec.log_step(step, step_metrics(step))
                calls.append(time.perf_counter() - t0)
            loop_s = time.perf_counter() - start
            t0 = time.perf_counter()
            rec.finish("completed")
            results["finish_s"].append(time.perf_counter() - t0)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if warnings:
        raise RuntimeError(f"{report_to}: {warnings}")
    results["call_us"].append(statistics.fmean(calls) * 1e6)
    results["p99_us"].append(sorted(calls)[int(0.99 * (len(calls) - 1))] * 1e6)
    return sizes.steps / loop_s


def run(repeats: int, smoke: bool, log: Callable[[str], None] = print) -> dict[str, Any]:
    os.environ.setdefault("WANDB_MODE", "offline")      # no network: W&B writes its offline run folder
    os.environ.setdefault("WANDB_SILENT", "true")
    import torch

    sizes = SMOKE if smoke else FULL
    repeats = max(repeats, 1 if smoke else 5)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)            # the "training" takes one core; the mirrors may use the other
    try:
        work_ms = _work_ms(sizes)
        log(f"mirrors: {work_ms:.2f} ms of torch work per step")
        return _measure(sizes, repeats, smoke, work_ms, log)
    finally:
        torch.set_num_threads(threads)


def _work_ms(sizes: Sizes) -> float:
    """Warms torch up (the first contender must not pay for it) and times one step's work."""
    import torch

    a = torch.randn(sizes.work_matmul, sizes.work_matmul)
    for _ in range(20):
        a = torch.tanh(a @ a)
    start = time.perf_counter()
    for _ in range(50 * sizes.work_repeats):
        a = torch.tanh(a @ a)
    return (time.perf_counter() - start) / 50 * 1e3


def _measure(sizes: Sizes, repeats: int, smoke: bool, work_ms: float, log: Callable[[str], None]) -> dict[str, Any]:
    figures = {name: {"call_us": [], "p99_us": [], "finish_s": []} for name in CONTENDERS}
    load_before = os.getloadavg()
    log(f"mirrors: load average before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}")
    steps_per_s = alternate({name: (lambda n=name: one_run(CONTENDERS[n], sizes, figures[n]))
                             for name in CONTENDERS}, repeats, log)
    load_after = os.getloadavg()
    log(f"mirrors: load average after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    return part("Mirrors (TensorBoard, W&B offline)", settings={**asdict(sizes), "work_ms": work_ms},
                method=__doc__.split("\n\n")[1],
                rows=_rows(figures, steps_per_s), ratios=_ratios(steps_per_s),
                notes=[f"os.getloadavg() before {load_before}, after {load_after}",
                       "W&B runs offline (WANDB_MODE=offline): an online run adds network upload on wandb-core, "
                       "a separate process"],
                repeats=repeats, smoke=smoke, extra={"loadavg": {"before": load_before, "after": load_after}})


def _rows(figures: dict[str, dict[str, list[float]]], steps_per_s: dict[str, list[float]]) -> list[dict]:
    rows = []
    for name, values in figures.items():
        rows.append(row(f"{name}: log_step, training-thread time per call", values["call_us"], "µs",
                        higher_is_better=False))
        rows.append(row(f"{name}: log_step p99", values["p99_us"], "µs", higher_is_better=False))
        rows.append(row(f"{name}: loop with ~1 ms of torch work per step", steps_per_s[name], "steps/s"))
        rows.append(row(f"{name}: finish (drains the mirrors)", values["finish_s"], "s", higher_is_better=False))
    return rows


def _ratios(steps_per_s: dict[str, list[float]]) -> list[dict]:
    alone = steps_per_s["expdb alone"]
    return [ratio(f"loop steps/s, {name} / expdb alone", steps_per_s[name], alone)
            for name in CONTENDERS if name != "expdb alone"]

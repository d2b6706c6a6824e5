"""Data-parallel training on the CPU: torchrun with 2 processes (gloo) against 1 process.

    python -m bench ddp [--repeats N] [--smoke]

Both runs take the same sequences per optimizer step in the same order: 1 process with
micro-batch M x 2 accumulation on 2 threads, 2 processes with M x 1 each on 1 thread each
(so both use the machine's 2 cores). The model, corpus and cadence are those of the
throughput part. Per-step losses of the two are compared step by step (they should agree
to float rounding: the 2-process gradient is the average of two halves); speed is the median
of the trainer's own per-step tokens/s (the whole world's tokens; evaluation and checkpoint
time are outside a step), and the command's wall time, start-up and data loading included.
On 2 cores, 2 processes are not expected to be faster: the figure says what DDP costs here
(gradient all-reduce through gloo, a process per rank), not what 2 GPUs give.
"""
from __future__ import annotations

import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from bench.common import load_average, part, ratio, row

ONE, TWO = "1 process x 2 threads, accumulation 2", "2 processes (torchrun, gloo) x 1 thread"
SKIP_STEPS = 3          # the first steps allocate and warm caches


def sizes(smoke: bool) -> dict[str, Any]:
    if smoke:
        return {"subset": 0.03, "vocab-size": 512, "n-layer": 1, "n-embd": 32, "n-head": 2, "block-size": 32,
                "micro-batch": 4, "max-steps": 6, "eval-every": 3, "eval-batches": 2, "save-every": 3}
    return {"subset": 0.3, "vocab-size": 4096, "n-layer": 4, "n-embd": 128, "n-head": 4, "block-size": 128,
            "micro-batch": 8, "max-steps": 30, "eval-every": 15, "eval-batches": 8, "save-every": 15}


def command(nproc: int, out: Path, cache_dir: str, settings: dict[str, Any]) -> list[str]:
    flags = {**settings, "precision": "fp32", "device": "cpu", "progress": "false", "warmup-steps": 10,
             "seed": 0, "grad-accum": 2 // nproc, "cache-dir": cache_dir, "out": out, "db": f"{out}.db"}
    args = [x for k, v in flags.items() for x in (f"--{k}", str(v))]
    if nproc == 1:
        return [sys.executable, "-m", "trainer", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "trainer", *args]


def train(nproc: int, out: Path, cache_dir: str, settings: dict[str, Any]) -> float:
    """Runs one training command; returns its wall time in seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": str(2 // nproc), "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    done = subprocess.run(command(nproc, out, cache_dir, settings), env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{nproc}-process run failed (exit {done.returncode}):\n{done.stdout[-2000:]}"
                           f"{done.stderr[-2000:]}")
    return time.perf_counter() - started


def step_metrics(db: str) -> dict[int, tuple[float, float, int]]:
    with sqlite3.connect(db) as c:
        return {s: (loss, tps, seen) for s, loss, tps, seen in
                c.execute("SELECT step, loss, tokens_per_s, tokens_seen FROM step_metrics")}


def worst_relative_difference(a: dict[int, tuple], b: dict[int, tuple]) -> float:
    if sorted(a) != sorted(b):
        raise RuntimeError(f"the runs logged different steps: {sorted(a)} and {sorted(b)}")
    return max(abs(a[s][0] - b[s][0]) / abs(b[s][0]) for s in a)


def run(repeats: int, smoke: bool, cache_dir: str = ".cache/bench",
        log: Callable[[str], None] = print) -> dict[str, Any]:
    settings = sizes(smoke)
    work = Path(tempfile.mkdtemp(prefix="bench-ddp-"))
    train(1, work / "warm-up", cache_dir, {**settings, "max-steps": 1})     # tokenizer and token cache
    wall = {ONE: [], TWO: []}
    speed = {ONE: [], TWO: []}
    worst, loads = [], []
    for r in range(repeats):
        metrics = {}
        order = [(1, ONE), (2, TWO)] if r % 2 == 0 else [(2, TWO), (1, ONE)]
        for nproc, name in order:
            out = work / f"round{r}-{nproc}"
            wall[name].append(train(nproc, out, cache_dir, settings))
            metrics[name] = step_metrics(f"{out}.db")
            speed[name].append(statistics.median(v[1] for s, v in metrics[name].items() if s > SKIP_STEPS))
            log(f"  round {r + 1}/{repeats} {name}: {speed[name][-1]:,.0f} tokens/s, {wall[name][-1]:.1f} s")
        worst.append(worst_relative_difference(metrics[TWO], metrics[ONE]))
        loads.append(load_average())
    last = max(metrics[ONE])
    seen = {name: metrics[name][last][2] for name in (ONE, TWO)}
    rows = [row(f"{n}: per-step speed", speed[n], "tokens/s") for n in (ONE, TWO)]
    rows += [row(f"{n}: command wall time", wall[n], "s", higher_is_better=False,
                 note="start-up, data loading, evaluations and checkpoints included") for n in (ONE, TWO)]
    rows.append(row("largest relative difference of a step's loss, 2 processes against 1", worst, "",
                    higher_is_better=False, note=f"over all {last} steps"))
    return part("Data-parallel on the CPU: torchrun, 2 processes against 1", repeats=repeats, smoke=smoke,
                settings={**settings, "precision": "fp32", "sequences per step": settings["micro-batch"] * 2},
                method="the same training command as 1 process (2 threads, accumulation 2) and through torchrun "
                       "as 2 processes (gloo, 1 thread each, accumulation 1), alternating which goes first; "
                       f"speed is the median of the trainer's per-step tokens/s after step {SKIP_STEPS}",
                rows=rows,
                ratios=[ratio("2 processes / 1 process, per-step speed", speed[TWO], speed[ONE]),
                        ratio("2 processes / 1 process, command wall time", wall[TWO], wall[ONE])],
                notes=[f"tokens seen after step {last}: {seen[ONE]:,} (1 process), {seen[TWO]:,} (2 processes)"],
                extra={"load_average": {"per_round": loads}})

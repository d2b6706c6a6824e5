"""Metric logging: expdb's recorder against MLflow and a raw SQLAlchemy executemany.

The unit is one training step's record: the six metrics the trainer reports per step (loss,
lr, grad_norm, tokens_per_s, epoch, tokens_seen). expdb and the raw insert store it as one
row; MLflow stores six metric rows. Every contender writes to its own fresh SQLite file,
and the time runs until the data is committed (expdb: ``finish`` included).
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from bench.common import alternate, part, ratio, row

METRICS = ("loss", "lr", "grad_norm", "tokens_per_s", "epoch", "tokens_seen")


@dataclass(frozen=True)
class Sizes:
    expdb_steps: int = 50_000
    raw_steps: int = 50_000
    mlflow_batch_steps: int = 5_000      # log_batch: batches of 1,000 metric entities
    mlflow_metric_steps: int = 50        # log_metric: one call per metric (300 calls)
    batch_entities: int = 1000


FULL = Sizes()
SMOKE = Sizes(expdb_steps=500, raw_steps=500, mlflow_batch_steps=200, mlflow_metric_steps=5)


def step_metrics(step: int) -> dict[str, float]:
    return {"loss": 3.0 + math.sin(step) * 0.1, "lr": 1e-3, "grad_norm": 0.5 + (step % 7) * 0.01,
            "tokens_per_s": 8000.0 + step % 13, "epoch": step // 1000, "tokens_seen": step * 2048}


def run_info():
    from trainer.recorder import RunInfo
    return RunInfo(name="bench", config={"lr": 1e-3}, dataset={"source": "bench"}, tokenizer={"kind": "bpe"},
                   n_params=1, device="cpu", precision="fp32", host="bench")


# -- contenders: each returns steps per second -----------------------------------------
def expdb_recorder(work: Path, steps: int, call_times: list[float] | None = None) -> float:
    """DBRecorder.log_step for every step, then finish (which writes what is left)."""
    import expdb
    db = expdb.open(work / "expdb.db")
    try:
        rec = db.recorder()
        rec.start_run(run_info())
        start = time.perf_counter()
        for step in range(1, steps + 1):
            rec.log_step(step, step_metrics(step))
        logged = time.perf_counter()
        rec.finish("completed")
        end = time.perf_counter()
    finally:
        db.close()
    if call_times is not None:
        call_times.append((logged - start) / steps)
    return steps / (end - start)


def raw_sqlalchemy(work: Path, steps: int, batch: int) -> float:
    """SQLAlchemy Core executemany of ``batch`` rows per transaction into a WAL SQLite table."""
    from sqlalchemy import Column, Float, Integer, MetaData, Table, create_engine, insert

    engine = create_engine(f"sqlite:///{work / 'raw.db'}")
    meta = MetaData()
    table = Table("step_metrics", meta, Column("id", Integer, primary_key=True), Column("run_id", Integer),
                  Column("step", Integer), *[Column(m, Float) for m in METRICS])
    meta.create_all(engine)
    with engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA journal_mode=WAL")
    start = time.perf_counter()
    for first in range(1, steps + 1, batch):
        rows = [{"run_id": 1, "step": s, **step_metrics(s)} for s in range(first, min(steps + 1, first + batch))]
        with engine.begin() as conn:
            conn.execute(insert(table), rows)
    seconds = time.perf_counter() - start
    engine.dispose()
    return steps / seconds


class MlflowStore:
    """One MLflow tracking database, created once (its migrations take seconds), one run per call."""

    def __init__(self, work: Path):
        import mlflow
        logging.getLogger("mlflow").setLevel(logging.ERROR)
        logging.getLogger("alembic").setLevel(logging.ERROR)
        os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
        self.mlflow = mlflow
        mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
        mlflow.set_experiment("bench")

    def log_metric(self, steps: int) -> float:
        with self.mlflow.start_run():
            start = time.perf_counter()
            for step in range(1, steps + 1):
                for name, value in step_metrics(step).items():
                    self.mlflow.log_metric(name, value, step=step)
            return steps / (time.perf_counter() - start)

    def log_batch(self, steps: int, batch_entities: int) -> float:
        from mlflow.entities import Metric
        client = self.mlflow.MlflowClient()
        with self.mlflow.start_run() as active:
            run_id = active.info.run_id
            start = time.perf_counter()
            pending: list[Metric] = []
            timestamp = int(time.time() * 1000)
            for step in range(1, steps + 1):
                pending += [Metric(k, v, timestamp, step) for k, v in step_metrics(step).items()]
                if len(pending) >= batch_entities:
                    client.log_batch(run_id, metrics=pending[:batch_entities])
                    pending = pending[batch_entities:]
            if pending:
                client.log_batch(run_id, metrics=pending)
            return steps / (time.perf_counter() - start)


def in_fresh_dir(fn: Callable[[Path], float]) -> Callable[[], float]:
    def run() -> float:
        work = Path(tempfile.mkdtemp(prefix="bench-log-"))
        try:
            return fn(work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return run


def run(repeats: int, smoke: bool, log: Callable[[str], None] = print) -> dict[str, Any]:
    sizes = SMOKE if smoke else FULL
    mlflow_dir = Path(tempfile.mkdtemp(prefix="bench-mlflow-"))
    call_times: list[float] = []
    try:
        setup_start = time.perf_counter()
        store = MlflowStore(mlflow_dir)
        log(f"logging: MLflow store created in {time.perf_counter() - setup_start:.1f} s (not timed)")
        results = alternate({
            "expdb DBRecorder.log_step": in_fresh_dir(lambda w: expdb_recorder(w, sizes.expdb_steps, call_times)),
            "raw SQLAlchemy executemany": in_fresh_dir(lambda w: raw_sqlalchemy(w, sizes.raw_steps, 1000)),
            "MLflow log_batch": lambda: store.log_batch(sizes.mlflow_batch_steps, sizes.batch_entities),
            "MLflow log_metric": lambda: store.log_metric(sizes.mlflow_metric_steps),
        }, repeats, log)
    finally:
        shutil.rmtree(mlflow_dir, ignore_errors=True)
    ours = results["expdb DBRecorder.log_step"]
    rows = [row(name, values, "steps/s") for name, values in results.items()]
    rows.append(row("expdb log_step, training-thread time per call", [t * 1e6 for t in call_times], "µs",
                    higher_is_better=False, note="what a training step pays; the writer thread does the rest"))
    return part(
        "Metric logging", settings=asdict(sizes),
        method=("one step = the trainer's six step metrics; each contender writes a fresh SQLite file and the "
                "clock stops when everything is committed (expdb: after finish); rounds alternate"),
        rows=rows,
        ratios=[ratio("expdb / MLflow log_metric", ours, results["MLflow log_metric"]),
                ratio("expdb / MLflow log_batch", ours, results["MLflow log_batch"]),
                ratio("expdb / raw SQLAlchemy executemany", ours, results["raw SQLAlchemy executemany"])],
        repeats=repeats, smoke=smoke)

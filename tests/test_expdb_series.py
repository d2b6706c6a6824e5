"""Step reads: the whole history (``steps``) and the reduction for plots (``step_series``),
and the step rollups the writer keeps beside step_metrics. Both backends."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import create_engine, text

import expdb
from expdb.models import ROLLUP_BLOCK
from test_expdb import db, db_url, make_info  # noqa: F401 - fixtures

N = 30_000          # enough for the rollup path (> 2 x 64 steps per bucket at 2000 points)


def spiky(step: int) -> dict[str, float]:
    """A smooth loss with spikes at known steps, a warmup-then-constant lr, a NaN at 12345."""
    loss = 5.0 * math.exp(-step / 8000) + 0.01 * (step % 7)
    if step in (777, 20_001):
        loss += 50.0
    if step == 12_345:
        loss = math.nan
    return {"loss": loss, "lr": 1e-3 * min(1.0, step / 1000), "grad_norm": 1.0 + (step % 13) / 13,
            "tokens_per_s": 1000.0, "epoch": step // 10_000, "tokens_seen": 64 * step}


def long_run(db: expdb.ExperimentDB, steps=range(1, N + 1)) -> int:
    rec = db.recorder(batch_rows=10_000)
    run_id = rec.start_run(make_info("long"))
    for step in steps:
        rec.log_step(step, spiky(step))
    rec.finish("completed")
    return run_id


def raw_rollups(url: str, run_id: int) -> list[tuple]:
    engine = create_engine(url)
    with engine.connect() as conn:
        rows = [tuple(r) for r in conn.execute(text(
            "SELECT * FROM step_rollups WHERE run_id = :r ORDER BY block"), {"r": run_id})]
    engine.dispose()
    return rows


def rebuilt_rollups(db: expdb.ExperimentDB, run_id: int) -> list[tuple]:
    from expdb import maintenance
    maintenance.repair_rollups(db)
    return raw_rollups(db.url, run_id)


def test_step_series_keeps_every_extreme_and_the_nan(db: expdb.ExperimentDB):
    run_id = long_run(db)
    series = db.step_series(run_id, columns=("loss", "lr", "grad_norm"), max_points=2000)
    assert list(series.columns) == ["step", "loss", "lr", "grad_norm"]
    assert 100 < len(series) <= 2000 and series["step"].is_monotonic_increasing
    # Every row is a real row: its values are those logged at its step.
    full = db.steps(run_id).set_index("step")
    pd.testing.assert_frame_equal(series.set_index("step"), full.loc[series["step"], ["loss", "lr", "grad_norm"]],
                                  check_names=False)
    steps = set(series["step"])
    assert {777, 20_001, 12_345} <= steps                       # the spikes and the NaN
    assert math.isnan(series.set_index("step").loc[12_345, "loss"])
    assert series["loss"].max() == full["loss"].max() and series["loss"].min() == full["loss"].min()
    assert series["step"].iloc[0] == 1 and 1000 in steps        # lr: its first value, where warmup ends
    assert series["grad_norm"].max() == full["grad_norm"].max()


def test_step_series_of_a_short_run_is_the_run_itself(db: expdb.ExperimentDB):
    run_id = long_run(db, steps=range(0, 500))
    series = db.step_series(run_id, columns=["loss", "tokens_seen"])
    pd.testing.assert_frame_equal(series, db.steps(run_id)[["step", "loss", "tokens_seen"]])


def test_step_series_from_rows_between_the_two_paths(db: expdb.ExperimentDB):
    run_id = long_run(db, steps=range(1, 3001))    # buckets narrower than two rollup blocks
    series = db.step_series(run_id, columns=("loss",), max_points=300)
    assert len(series) <= 300 and 777 in set(series["step"])
    full = db.steps(run_id)
    assert series["loss"].max() == full["loss"].max()


def test_step_series_rejects_unknown_columns(db: expdb.ExperimentDB):
    run_id = long_run(db, steps=range(10))
    with pytest.raises(expdb.InvalidValueError, match="'val_loss'.*choose from epoch, loss"):
        db.step_series(run_id, columns=("loss", "val_loss"))
    with pytest.raises(expdb.InvalidValueError, match="too small"):
        db.step_series(run_id, max_points=3)
    with pytest.raises(expdb.UnknownRunError):
        db.step_series(run_id + 1)


def test_rollups_match_a_rebuild_after_replays_and_resume(db: expdb.ExperimentDB):
    rec = db.recorder(batch_rows=100, flush_interval_s=0.01)
    run_id = rec.start_run(make_info("replays"))
    for step in range(0, 700):
        rec.log_step(step, spiky(step))
    rec.log_epoch(0, {})                                   # flushed: a block is half written
    for step in (10, 650, 651):                            # logged again (an OOM retry): replaced
        rec.log_step(step, {"loss": 99.0 + step, "lr": 0.5})
    for step in range(700, 900):
        rec.log_step(step, spiky(step))
    rec.finish("interrupted", "SIGTERM")
    written = raw_rollups(db.url, run_id)

    resumed = db.recorder()
    resumed.start_run(make_info("replays", extra={"run_id": run_id, "resume_step": 777}))
    after_resume = raw_rollups(db.url, run_id)
    for step in range(778, 1000):
        resumed.log_step(step, spiky(step) | {"loss": 0.5})
    resumed.finish("completed")
    final = raw_rollups(db.url, run_id)

    assert sum(r[2] for r in written) == 900
    assert [r[1] for r in after_resume] == list(range(777 // ROLLUP_BLOCK + 1))
    assert after_resume[-1][4] == 777                       # the kept block ends at the resume step
    assert final == rebuilt_rollups(db, run_id)
    series = db.step_series(run_id, columns=("loss",), max_points=40)
    assert {10, 651} <= set(series["step"])                 # the replayed maxima
    assert sum(r[2] for r in final) == len(db.steps(run_id)) == 1000


def test_steps_frame_types(db: expdb.ExperimentDB):
    rec = db.recorder()
    run_id = rec.start_run(make_info())
    rec.log_step(1, {"loss": 1.0})                          # nothing else reported
    rec.log_step(2, {"loss": math.inf, "lr": np.float32(0.5), "epoch": np.int64(1), "tokens_seen": 64})
    rec.finish("completed")
    steps = db.steps(run_id)
    assert list(steps.columns) == ["run_id", "step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s",
                                   "tokens_seen"]
    assert steps["grad_norm"].dtype == "float64" and steps["grad_norm"].isna().all()
    assert steps["loss"].tolist() == [1.0, math.inf] and steps["lr"].tolist()[1] == 0.5

"""The learning-rate finder: its rule on made-up curves, then the command on a tiny model."""
import json
import math

import numpy as np
import pytest

import expdb
from trainer.errors import ConfigError
from trainer.lr_find import (MINIMUM_TENTH, PLOT_FILE, RESULT_FILE, STEEPEST, Curve, FinderSettings, lr_range,
                             main, suggest)


def curve_of(lrs, losses):
    return Curve(tuple(lrs), tuple(losses), tuple(losses), "test")


def test_the_suggestion_is_the_steepest_descent_before_the_minimum():
    lrs = np.logspace(-6, 0, 61)
    # flat, then falling fastest around 1e-3 (a tanh step in log lr), then rising past 1e-1
    losses = 6 - 2 * np.tanh(2 * (np.log10(lrs) + 3)) + np.where(lrs > 1e-1, 40 * (lrs - 1e-1), 0)
    s = suggest(curve_of(lrs, losses))
    assert s.rule == STEEPEST and s.lr == pytest.approx(1e-3, rel=0.3)
    assert s.minimum_lr == pytest.approx(1e-1, rel=0.3)


def test_a_curve_too_short_for_a_slope_falls_back_to_the_minimum_over_ten():
    s = suggest(curve_of([1e-4, 1e-3, 1e-2, 1e-1], [5.0, 4.0, 3.0, 9.0]))
    assert (s.rule, s.lr, s.steepest_lr, s.minimum_lr) == (MINIMUM_TENTH, pytest.approx(1e-3), None, 1e-2)


def test_the_learning_rate_rises_exponentially_and_bad_settings_name_their_flag():
    settings = FinderSettings(1e-6, 1.0, 7)
    assert [settings.lr_at(i) for i in range(7)] == pytest.approx([1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0])
    assert FinderSettings().problems() == []
    assert FinderSettings(1e-2, 1e-3, 5) .problems() == [
        "--max-lr 0.001: must be above --min-lr 0.01; e.g. --min-lr 1e-6 --max-lr 1",
        "--steps 5: use 10..100000 optimizer steps (a few hundred is usual)"]


def test_a_study_range_is_a_decade_around_the_suggestion_below_the_minimum(tmp_path):
    (tmp_path / RESULT_FILE).write_text(json.dumps({"suggested_lr": 1e-3, "minimum_lr": 1e-2}))
    assert lr_range(tmp_path) == pytest.approx((1e-3 / math.sqrt(10), 1e-3 * math.sqrt(10)))
    (tmp_path / RESULT_FILE).write_text(json.dumps({"suggested_lr": 1e-3, "minimum_lr": 2e-3}))
    assert lr_range(tmp_path)[1] == pytest.approx(2e-3)
    with pytest.raises(ConfigError, match="--lr-from-finder '.*missing': no readable lr_find.json"):
        lr_range(tmp_path / "missing")


TINY = ("--subset 0.03 --vocab-size 512 --n-layer 1 --n-embd 32 --n-head 2 --block-size 32 --micro-batch 8 "
        "--precision fp32 --progress false --steps 40 --min-lr 1e-5 --max-lr 10").split()


def made_up_loss(lr: float) -> float:
    """Falls fastest around lr 1e-3 (from 8 to 4: never 4x its best), then NaN past lr 1."""
    return 6 - 2 * math.tanh(2 * (math.log10(lr) + 3)) if lr <= 1 else math.nan


def test_the_finder_writes_its_curve_and_plot_records_a_run_and_no_checkpoint(tmp_path, data_cache, capsys,
                                                                               monkeypatch):
    # Each real optimizer step is taken, but the loss the finder sees is the test's: where real
    # training blows up depends on the CPU's kernels (one without native bf16 went 40 steps at
    # lr 10 without diverging), so the divergence is forced, at a step known in advance.
    import trainer.lr_find

    real_step, real_losses = trainer.lr_find._step, []

    def step(model, optimizer, scaler, blocks, ids, cfg, placement, lr):
        real_losses.append(real_step(model, optimizer, scaler, blocks, ids, cfg, placement, lr))
        return made_up_loss(lr)

    monkeypatch.setattr(trainer.lr_find, "_step", step)
    out, db_path = tmp_path / "finder", tmp_path / "exp.db"
    code = main([*TINY, "--out", str(out), "--db", str(db_path), "--cache-dir", str(data_cache)])
    assert code == 0
    result = json.loads((out / RESULT_FILE).read_text())
    printed = capsys.readouterr().out
    assert f"train with: --lr {result['suggested_lr']:.3g}" in printed
    assert (out / PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir()) == [RESULT_FILE, PLOT_FILE]      # no checkpoints folder
    lrs = result["curve"]["lr"]
    assert lrs[0] == pytest.approx(1e-5) and all(b > a for a, b in zip(lrs, lrs[1:]))
    # lr_at(33) = 1e-5 * 1e6 ** (33 / 39) = 1.19 is the first past 1: its NaN stops the test at step 34.
    settings = FinderSettings(1e-5, 10.0, 40)
    assert lrs == [settings.lr_at(i) for i in range(34)] and len(real_losses) == 34
    assert result["stopped"].startswith("diverged at step 34 (lr 1.19)")
    assert result["curve"]["loss"] == [made_up_loss(lr) for lr in lrs[:33]] + ["nan"]
    assert result["steps_taken"] == 34
    # The suggestion is the rule's on the curve the finder measured (its smoothed loss lags the
    # made-up one, so the steepest descent lies a little past 1e-3), and the minimum the last finite step.
    measured = Curve(tuple(lrs), tuple(made_up_loss(lr) for lr in lrs), tuple(
        math.inf if v == "inf" else v for v in result["curve"]["smoothed"]), result["stopped"])
    assert (result["suggested_lr"], result["rule"]) == (suggest(measured).lr, STEEPEST)
    assert 1e-3 <= result["suggested_lr"] <= 1e-1 and result["minimum_lr"] == lrs[32]
    db = expdb.open(db_path)
    run = db.run(result["run_id"])
    assert run.name == "lr_find:finder" and run.status == "completed"
    events = db.events(run.id)
    (detail,) = events[events.kind == "lr_find"].detail
    assert detail["suggested_lr"] == result["suggested_lr"]
    assert len(db.steps(run.id)) == len(lrs)

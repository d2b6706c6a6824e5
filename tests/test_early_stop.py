"""Early stopping: the rule on lists of numbers, then a real run that stops and exports its best."""
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import expdb
from dashboards.run_data import fetch_run_data
from dashboards.run_records import Marker
from trainer.early_stop import EarlyStop, best_of, decide
from trainer.run import train


def history(*losses, every=10):
    return [(every * (i + 1), loss) for i, loss in enumerate(losses)]


@pytest.mark.parametrize("losses, patience, min_delta, expected", [
    ((5.0, 4.0, 3.0), 2, 0.0, None),                                  # improving: go on
    ((5.0, 4.0, 4.1), 2, 0.0, None),                                  # one eval without: patience 2 waits
    ((5.0, 4.0, 4.1, 4.2), 2, 0.0, EarlyStop(40, 20, 4.0, 2)),        # two without: stop, best at 20
    ((5.0, 4.0, 4.0), 1, 0.0, EarlyStop(30, 20, 4.0, 1)),             # a tie is no improvement
    ((5.0, 4.95, 4.9), 2, 0.1, EarlyStop(30, 30, 4.9, 2)),            # small gains do not count...
    ((5.0, 4.95, 4.89, 4.85), 2, 0.1, None),                          # ...until they add up to min_delta
    ((5.0, 4.0, 4.1, 4.2), 0, 0.0, None),                             # patience 0: never
    ((5.0, math.nan, math.nan), 2, 0.0, EarlyStop(30, 10, 5.0, 2)),   # NaN never improves
    ((), 2, 0.0, None),
])
def test_the_decision_is_a_function_of_the_eval_history(losses, patience, min_delta, expected):
    assert decide(history(*losses), patience, min_delta) == expected


def test_the_reason_names_the_stop_and_the_best_step():
    assert EarlyStop(40, 20, 4.0, 2).reason == "early stop at step 40 (best at step 20)"
    assert best_of(history(3.0, 2.0, 2.0, 2.5)) == (20, 2.0)          # the earliest of equal losses
    assert best_of(history(math.nan)) == (-1, math.inf)


# The validation losses the run sees: they fall, then turn up, so patience 2 stops at step 16 with
# the best at step 8. Where a real run's loss turns up depends on the machine's arithmetic.
VAL_LOSSES = {4: 5.0, 8: 4.0, 12: 4.5, 16: 4.6}


@pytest.fixture
def stopping_cfg(tiny_cfg, monkeypatch):
    # Every evaluation really runs; the loss it reports is the test's (9.0 past step 16).
    import trainer.loop

    real_evaluate = trainer.loop.Trainer.evaluate

    def evaluate(self):
        real = real_evaluate(self)
        return trainer.loop.Evaluation(VAL_LOSSES.get(self.state.step, 9.0), real.bpb, real.word_ppl)

    monkeypatch.setattr(trainer.loop.Trainer, "evaluate", evaluate)
    # keep_checkpoints 1: rotation keeps only the newest and the best, so the best must be kept.
    return tiny_cfg.replace(schedule="constant", warmup_steps=0, eval_every=4, early_stop_patience=2,
                            keep_checkpoints=1)


def test_a_run_stops_early_and_exports_its_best_checkpoint(stopping_cfg, tiny_data, tmp_path):
    db = expdb.open(tmp_path / "es.db")
    result = train(stopping_cfg, db.recorder(), data=tiny_data, log=lambda *_: None)
    run = db.run(result.run_id)
    assert result.status == run.status == "completed"
    stop, best = (int(x) for x in result.reason.removeprefix("early stop at step ").rstrip(")").split(
        " (best at step "))
    assert result.reason == run.status_reason == f"early stop at step {stop} (best at step {best})"
    assert (best, stop) == (8, 16) and result.steps == stop      # of the 60 steps of the 2 epochs
    events = db.events(result.run_id)
    (detail,) = events[events.kind == "early_stop"].detail
    assert (detail["best_step"], detail["steps_saved"], detail["patience"]) == (best, 60 - stop, 2)
    best_dir = tmp_path / "run" / "checkpoints" / f"step-{best:07d}"
    assert Path(detail["best_checkpoint"]) == best_dir.resolve() and best_dir.is_dir()   # not rotated away
    exported = load_file(tmp_path / "run" / "final_model" / "model.safetensors")
    best_weights = load_file(best_dir / "model.safetensors")
    last_weights = load_file(tmp_path / "run" / "checkpoints" / f"step-{stop:07d}" / "model.safetensors")
    assert best_weights.keys() <= exported.keys()
    assert all(torch.equal(exported[k], best_weights[k]) for k in best_weights)   # the best weights...
    assert not all(torch.equal(exported[k], last_weights[k]) for k in last_weights)  # ...not the last
    markers = fetch_run_data(db, result.run_id).markers          # the dashboard draws the stop
    assert Marker("early_stop", float(stop)) in markers and Marker("best", float(best)) in markers


def test_without_patience_the_same_run_goes_to_the_end(stopping_cfg, tiny_data, tmp_path):
    result = train(stopping_cfg.replace(early_stop_patience=0, out_dir=str(tmp_path / "plain")), data=tiny_data,
                   log=lambda *_: None)
    assert result.status == "completed" and result.steps == 60 and result.reason is None

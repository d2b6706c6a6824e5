"""Time limits and the resume settings: parsing, checks, and when the clock says stop."""
from datetime import datetime

import pytest

from trainer.clock import StopClock, parse_deadline, parse_duration, seconds_allowed
from trainer.config import TrainConfig
from trainer.errors import ConfigError


@pytest.mark.parametrize("text,seconds", [("8h45m", 31500), ("90m", 5400), ("3600s", 3600), ("1d", 86400),
                                          ("1.5h", 5400), ("2h 30m", 9000), ("45S", 45)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "3600", "8 hours", "h", "-5m", "0s", "5m5"])
def test_bad_durations_name_an_example(text):
    with pytest.raises(ValueError, match="8h45m"):
        parse_duration(text)


def test_deadlines_are_the_next_such_clock_time_or_an_iso_time():
    now = datetime(2025, 6, 1, 20, 0)
    assert parse_deadline("21:30", now) == datetime(2025, 6, 1, 21, 30)
    assert parse_deadline("07:15", now) == datetime(2025, 6, 2, 7, 15)      # tomorrow morning
    assert parse_deadline("2025-06-03T08:00", now) == datetime(2025, 6, 3, 8, 0)
    assert seconds_allowed("1h", "20:30", now) == pytest.approx(1800)      # the nearer limit wins
    assert seconds_allowed("", "", now) is None
    for bad in ("25:00", "tomorrow", "9pm"):
        with pytest.raises(ValueError, match="21:30"):
            parse_deadline(bad, now)


def test_config_checks_name_flag_value_and_fix(tmp_path):
    cfg = TrainConfig(time_budget="8 hours", deadline="9pm", keep_checkpoints=0, max_checkpoint_gb=-1.0,
                      resume=str(tmp_path / "missing"), resume_from=[str(tmp_path / "nope")],
                      save_optimizer_state="no")
    with pytest.raises(ConfigError) as err:
        cfg.check()
    problems = err.value.problems
    expected = ["--time-budget '8 hours': write it as 8h45m", "--deadline '9pm': write it as a local clock time",
                "--keep-checkpoints 0: use a positive integer", "--max-checkpoint-gb -1.0",
                "--resume '", "--resume-from '", "--save-optimizer-state 'no': use true or false"]
    for text in expected:
        assert any(p.startswith(text) for p in problems), (text, problems)
    TrainConfig(resume="auto", resume_from=[str(tmp_path)], time_budget="8h45m", deadline="21:30").check()


def test_resume_from_without_auto_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="--resume-from given with --resume '': .*add --resume auto"):
        TrainConfig(resume_from=[str(tmp_path)]).check()


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_the_clock_stops_when_a_step_and_a_save_no_longer_fit():
    fake = FakeClock()
    clock = StopClock(100.0, clock=fake)           # margin: 2% of 100 s
    assert not clock.should_stop(eval_next=False, checkpoint_bytes=0)
    clock.record_step(4.0)
    clock.record_write(3.0)
    clock.record_eval(10.0)
    # one step (x1.5 for safety) + the write + the margin = 6 + 3 + 2 = 11 s
    assert clock.needed(False, 0) == pytest.approx(11.0)
    fake.now = 88.0
    assert not clock.should_stop(False, 0) and clock.should_stop(True, 0)   # an evaluation would not fit
    fake.now = 89.5
    assert clock.should_stop(False, 0)


def test_before_a_write_is_timed_the_clock_assumes_a_slow_disk():
    clock = StopClock(3600.0, clock=FakeClock())
    assert clock.needed(False, checkpoint_bytes=500_000_000) == pytest.approx(10.0 + 60.0)  # 50 MB/s, 60 s margin


def test_no_limit_never_stops():
    clock = StopClock(None, clock=FakeClock())
    clock.record_step(1e9)
    assert not clock.should_stop(True, 10**12) and clock.remaining() == float("inf")

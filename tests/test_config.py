"""The config object: every problem found at once, named by flag, value and fix."""
import json

import pytest

from trainer.config import TrainConfig, flag, load_config_file
from trainer.errors import ConfigError
from trainer.presets import PRESETS, preset_values
from trainer.schedule import lr_at


def test_defaults_and_presets_are_valid():
    TrainConfig().check()
    for name in PRESETS:
        TrainConfig.from_dict(preset_values(name)).check()


def test_every_problem_is_reported_with_flag_value_and_fix():
    cfg = TrainConfig(lr=-1.0, n_embd=130, n_head=4, micro_batch=0, precision="fp8")
    with pytest.raises(ConfigError) as err:
        cfg.check()
    problems = err.value.problems
    assert any(p.startswith("--lr -1.0:") and "positive" in p for p in problems)
    assert any("--micro-batch 0" in p for p in problems)
    assert any("--n-embd 130 is not divisible by --n-head 4" in p for p in problems)
    assert any("--precision 'fp8'" in p and "fp32" in p for p in problems)
    assert len(problems) == 4


@pytest.mark.parametrize("value", [float("nan"), float("inf"), True])
def test_non_finite_or_bool_learning_rate_is_refused(value):
    with pytest.raises(ConfigError, match="--lr"):
        TrainConfig(lr=value).check()


def test_unknown_setting_and_unknown_preset():
    with pytest.raises(ConfigError, match="unknown setting 'learning_rate'"):
        TrainConfig().replace(learning_rate=1e-3)
    with pytest.raises(ConfigError, match="--preset 'huge'.*quick"):
        preset_values("huge")


def test_flag_names():
    assert flag("n_embd") == "--n-embd"


def test_arch_is_gpt2_or_llama_and_gpt2_for_a_config_without_one():
    assert TrainConfig.from_dict({"n_layer": 2}).arch == "gpt2"
    TrainConfig(arch="llama").check()
    with pytest.raises(ConfigError) as err:
        TrainConfig(arch="mamba").check()
    assert err.value.problems == ["--arch 'mamba': choose one of gpt2, llama"]


def test_config_files_yaml_json_and_errors(tmp_path):
    (tmp_path / "c.yaml").write_text("lr: 0.002\nn-layer: 3\n")
    assert load_config_file(tmp_path / "c.yaml") == {"lr": 0.002, "n_layer": 3}
    (tmp_path / "c.json").write_text(json.dumps({"config": {"epochs": 4}}))
    assert load_config_file(tmp_path / "c.json") == {"epochs": 4}
    with pytest.raises(ConfigError, match="--config .*no such file"):
        load_config_file(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("lr: [1,\n")
    with pytest.raises(ConfigError, match="cannot be parsed"):
        load_config_file(tmp_path / "bad.yaml")


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    lrs = [lr_at(s, cfg, total_steps=110) for s in range(110)]
    assert lrs[0] == pytest.approx(1e-4)
    assert lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lr_at(110, cfg, 110) == pytest.approx(1e-4)
    linear = TrainConfig(lr=1e-3, warmup_steps=0, min_lr_ratio=0.0, schedule="linear")
    assert lr_at(50, linear, 100) == pytest.approx(5e-4)


def test_a_deadline_already_past_is_refused_by_the_command_lines_not_by_the_config():
    from datetime import datetime

    from trainer.clock import StopClock, deadline_problem

    now = datetime(2026, 6, 1, 12, 0)
    assert deadline_problem("2026-06-01T11:59", now) == (
        "--deadline '2026-06-01T11:59': that time has passed (it is now 2026-06-01T12:00 local time), so the run "
        "could take no step; pass a later time, e.g. a clock time such as 21:30 (the next one) or "
        "2026-06-02T12:00, or --time-budget 8h instead")
    assert deadline_problem("2026-06-01T12:00", now) is not None          # now: no time at all
    assert deadline_problem("2026-06-01T12:01", now) is None
    assert deadline_problem("11:00", now) is None                         # a clock time: the next one, tomorrow
    assert deadline_problem("", now) is None and deadline_problem("25:99", now) is None   # the config's to say
    assert TrainConfig(deadline="2020-01-01T00:00").problems() == []      # a study's trial may meet one
    # ...and such a run's clock needs no negative time (it said "need -4374376 s" once): it stops at once.
    clock = StopClock(-4374376.0, clock=lambda: 0.0)
    assert clock.needed(eval_next=False, checkpoint_bytes=0) == 0.0 and clock.should_stop(False, 0)

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

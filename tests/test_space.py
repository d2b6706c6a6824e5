"""Search-space files: every mistake reported before any trial starts."""
import optuna
import pytest

from studies.space import (DEFAULT_SPACES, Param, grid_space, load_space, space_problems, suggest_config,
                           vocabulary_problems)
from trainer.config import TrainConfig
from trainer.errors import ConfigError


def write(tmp_path, text):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def test_a_good_space_loads_and_suggests_within_its_ranges(tmp_path):
    space = load_space(write(tmp_path, """
lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
n_layer: {type: int, low: 1, high: 3}
n_embd: {type: categorical, choices: [64, 96]}
micro_batch: {type: categorical, choices: [4, 8]}
"""))
    assert [p.name for p in space] == ["lr", "n_layer", "n_embd", "micro_batch"]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    base = TrainConfig(micro_batch=8, grad_accum=2)
    for _ in range(20):
        values = suggest_config(study.ask(), space, base)
        assert 1e-4 <= values["lr"] <= 1e-2 and values["n_layer"] in (1, 2, 3) and values["n_embd"] in (64, 96)
        # the effective batch stays 16 whatever micro-batch is drawn
        assert values["micro_batch"] * values["grad_accum"] == 16


def test_every_mistake_is_reported_at_once(tmp_path):
    path = write(tmp_path, """
lrr: {type: float, low: 1.0e-4, high: 1.0e-2}
dropout: {type: float, low: 0.3, high: 0.1}
n_layer: {type: integer, low: 1, high: 3}
weight_decay: {type: float, low: 0.0, high: 0.1, log: true}
n_embd: {type: categorical, choices: []}
out_dir: {type: categorical, choices: [a, b]}
warmup_steps: {type: int, low: 1, hgih: 5}
""")
    with pytest.raises(ConfigError) as err:
        load_space(path)
    problems = "\n".join(err.value.problems)
    assert "'lrr': not a searchable training setting (did you mean 'lr'?)" in problems
    assert "'dropout': empty range: low 0.3 is not below high 0.1" in problems
    assert "'n_layer': type 'integer'" in problems
    assert "'weight_decay': log scale needs low > 0" in problems
    assert "'n_embd': categorical needs a non-empty list" in problems
    assert "'out_dir': not a searchable" in problems
    assert "'warmup_steps': unknown keys ['hgih']" in problems
    assert len(err.value.problems) == 8  # warmup_steps also lacks 'high'
    assert all(p.startswith(f"--space {str(path)!r}") for p in err.value.problems)


@pytest.mark.parametrize("text,message", [
    ("", "expected a mapping"),
    ("lr: [1, 2\n", "cannot be parsed"),
    ("lr: 0.1\n", "expected a mapping like"),
])
def test_malformed_files(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_space(write(tmp_path, text))


def test_missing_file():
    with pytest.raises(ConfigError, match="--space 'nope.yaml': no such file"):
        load_space("nope.yaml")


def test_grid_needs_finite_values():
    space = [Param("lr", low=1e-3, high=3e-3), Param("dropout", low=0.0, high=0.2, step=0.1),
             Param("n_layer", "int", 1, 2)]
    assert space_problems(space, "tpe") == []
    assert space_problems(space, "grid") == [
        "--sampler grid: parameter 'lr' is a float range without 'step'; add a step or use choices"]
    assert grid_space(space[1:]) == {"dropout": [0.0, 0.1, 0.2], "n_layer": [1, 2]}


def test_default_spaces_only_name_real_settings():
    for name, space in DEFAULT_SPACES.items():
        assert all(p.name in TrainConfig.__dataclass_fields__ for p in space), name


def test_an_lr_finder_result_sets_the_lr_range_unless_the_space_sets_lr(tmp_path):
    import json

    from studies.space import Param, default_space, with_finder_lr

    (tmp_path / "lr_find.json").write_text(json.dumps({"suggested_lr": 4e-3, "minimum_lr": 8e-3}))
    space = with_finder_lr(None, "quick", str(tmp_path))
    (lr,) = [p for p in space if p.name == "lr"]
    assert lr.log and lr.low == pytest.approx(4e-3 / 10 ** 0.5) and lr.high == pytest.approx(8e-3)
    assert [p.name for p in space if p.name != "lr"] == [p.name for p in default_space("quick") if p.name != "lr"]
    mine = [Param("lr", low=1e-4, high=2e-4, log=True)]
    assert with_finder_lr(mine, "quick", str(tmp_path)) == mine          # --space keeps precedence
    with pytest.raises(ConfigError, match="--lr-from-finder .*no readable lr_find.json"):
        with_finder_lr(None, "quick", str(tmp_path / "missing"))


def test_a_space_can_search_the_optimizer_and_muons_lr(tmp_path):
    space = load_space(write(tmp_path, """
optimizer: {type: categorical, choices: [adamw, muon]}
muon_lr: {type: float, low: 5.0e-3, high: 5.0e-2, log: true}
"""))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=4))
    drawn = [suggest_config(study.ask(), space, TrainConfig()) for _ in range(12)]
    assert {v["optimizer"] for v in drawn} == {"adamw", "muon"}
    assert all(5e-3 <= v["muon_lr"] <= 5e-2 and TrainConfig(**v).problems() == [] for v in drawn)


def test_a_categorical_choice_a_setting_does_not_have_is_reported(tmp_path):
    path = write(tmp_path, "optimizer: {type: categorical, choices: [adamw, muom]}\n"
                           "schedule: {type: categorical, choices: [cosine, linear]}\n")
    with pytest.raises(ConfigError) as err:
        load_space(path)
    assert err.value.problems == [(f"--space {str(path)!r}: parameter 'optimizer': choices ['muom'] are not "
                                   "settings of optimizer; use some of adamw, muon")]


def test_the_tokenizer_is_searched_among_named_choices_and_vocab_size_only_with_bpe(tmp_path):
    space = load_space(write(tmp_path, "tokenizer: {type: categorical, choices: [bpe, gpt2]}\n"
                                       "vocab_size: {type: int, low: 512, high: 4096, step: 512}\n"))
    assert [p.name for p in space] == ["tokenizer", "vocab_size"]
    assert vocabulary_problems(space, TrainConfig(tokenizer="gpt2")) == []      # bpe is among the choices
    assert vocabulary_problems(space[1:], TrainConfig()) == []                 # the default tokenizer: bpe
    problems = vocabulary_problems(space[1:], TrainConfig(tokenizer="gpt2"))
    assert len(problems) == 1 and "every trial uses the pretrained tokenizer gpt2" in problems[0]
    with pytest.raises(ConfigError) as err:
        load_space(write(tmp_path, "tokenizer: {type: int, low: 1, high: 2}\n"
                                   "vocab_size: {type: categorical, choices: [512]}\n"
                                   "n_layer: {type: categorical, choices: [1]}\n"
                                   "n_head: {type: categorical, choices: [2]}\n"))
    assert len(err.value.problems) == 1 and "'tokenizer': a tokenizer is one of named choices" in err.value.problems[0]
    with pytest.raises(ConfigError, match="'tokenizer': choices are tokenizers"):
        load_space(write(tmp_path, "tokenizer: {type: categorical, choices: [bpe, 7]}\n"))

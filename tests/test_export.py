"""Exports: the one-file JSON checkpoint (bit-exact both ways), final_model/ for transformers,
and text generation from it."""
import base64
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from trainer import export as export_cli
from trainer import generate as generate_cli
from trainer.checkpoints import MODEL_FILE, OPTIMIZER_FILE, load_checkpoint, read_checkpoint, read_info
from trainer.run import train


@pytest.fixture(scope="module")
def finished_run(tiny_base_cfg, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("exported")
    return train(tiny_base_cfg.replace(out_dir=str(out / "run"), epochs=1), data=tiny_data, log=lambda *_: None)


def test_json_export_round_trips_every_byte(finished_run, tmp_path, capsys):
    checkpoint = finished_run.final_checkpoint
    assert export_cli.main(["json", checkpoint, "--out", str(tmp_path / "c.json")]) == 0
    assert export_cli.main(["import", str(tmp_path / "c.json"), "--out", str(tmp_path / "back")]) == 0
    originals = sorted(p.name for p in Path(checkpoint).iterdir())
    assert sorted(p.name for p in (tmp_path / "back").iterdir()) == originals
    for name in originals:     # manifest.json included: the same sha256s, sizes and time written
        assert (tmp_path / "back" / name).read_bytes() == (Path(checkpoint) / name).read_bytes(), name
    assert "wrote" in capsys.readouterr().out


def test_the_json_needs_nothing_but_base64_and_numpy_to_read(finished_run, tmp_path):
    export_cli.main(["json", finished_run.final_checkpoint, "--out", str(tmp_path / "c.json")])
    doc = json.loads((tmp_path / "c.json").read_text())
    entry = doc["files"][MODEL_FILE]["tensors"]["transformer.wte.weight"]
    array = np.frombuffer(base64.b64decode(entry["data"]), dtype="<f4").reshape(entry["shape"])
    expected = load_file(f"{finished_run.final_checkpoint}/{MODEL_FILE}")["transformer.wte.weight"]
    assert entry["dtype"] == "F32" and np.array_equal(array, expected.numpy())
    assert doc["info"]["step"] == finished_run.steps and doc["files"]["trainer_state.json"]["json"]["config"]


def test_a_weights_only_json_export_is_smaller_and_still_loads(finished_run, tiny_base_cfg, tmp_path):
    full, light = tmp_path / "full.json", tmp_path / "light.json"
    export_cli.main(["json", finished_run.final_checkpoint, "--out", str(full)])
    export_cli.main(["json", finished_run.final_checkpoint, "--out", str(light), "--weights-only"])
    assert light.stat().st_size < full.stat().st_size / 2
    export_cli.main(["import", str(light), "--out", str(tmp_path / "back")])
    assert not (tmp_path / "back" / OPTIMIZER_FILE).exists() and read_info(tmp_path / "back").weights_only
    original = read_checkpoint(finished_run.final_checkpoint).tensors[MODEL_FILE]
    back = read_checkpoint(tmp_path / "back").tensors[MODEL_FILE]
    assert all(torch.equal(original[k], back[k]) for k in original)


@pytest.mark.parametrize("content,message", [
    (b"not json", "not a readable JSON file"),
    (json.dumps({"format": "something else"}).encode(), "not a smallgpt-lab-checkpoint JSON file"),
    (json.dumps({"format": "smallgpt-lab-checkpoint", "format_version": 1, "info": {}, "files": {
        "trainer_state.json": {"json": {}}, "../../evil.safetensors": {"tensors": {}}}}).encode(),
     "malformed"),
    (pickle.dumps({"a": 1}), "not a readable JSON file"),
])
def test_bad_json_imports_are_refused_and_write_nothing(tmp_path, capsys, content, message):
    (tmp_path / "in.json").write_bytes(content)
    with pytest.raises(SystemExit) as exit_:
        export_cli.main(["import", str(tmp_path / "in.json"), "--out", str(tmp_path / "back")])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.json"]


def test_export_cli_errors_name_the_argument(finished_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        export_cli.main(["json", str(tmp_path / "nope"), "--out", str(tmp_path / "x.json")])
    assert exit_.value.code == 2 and "CHECKPOINT_DIR" in capsys.readouterr().err
    (tmp_path / "exists").mkdir()
    export_cli.main(["json", finished_run.final_checkpoint, "--out", str(tmp_path / "c.json")])
    with pytest.raises(SystemExit):
        export_cli.main(["import", str(tmp_path / "c.json"), "--out", str(tmp_path / "exists")])
    assert "--out" in capsys.readouterr().err and list((tmp_path / "exists").iterdir()) == []


def test_an_imported_checkpoint_resumes_training(finished_run, tiny_base_cfg, tiny_data, tmp_path):
    export_cli.main(["json", finished_run.final_checkpoint, "--out", str(tmp_path / "c.json")])
    export_cli.main(["import", str(tmp_path / "c.json"), "--out", str(tmp_path / "restored")])
    more = train(tiny_base_cfg.replace(out_dir=str(tmp_path / "more"), epochs=2), data=tiny_data,
                 resume=str(tmp_path / "restored"), log=lambda *_: None)
    assert more.status == "completed" and more.steps == 2 * finished_run.steps


# -- final_model/ and generation ---------------------------------------------------------------
def test_final_model_loads_offline_with_transformers(finished_run, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    names = {p.name for p in Path(finished_run.final_model).iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "training_config.json"} <= names
    model = AutoModelForCausalLM.from_pretrained(finished_run.final_model)
    tok = AutoTokenizer.from_pretrained(finished_run.final_model)
    gen = pipeline("text-generation", model=model, tokenizer=tok)
    out = gen("import os\n", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert out.startswith("import os\n") and len(out) > len("import os\n")
    # the exported weights are the final checkpoint's
    final = load_file(f"{finished_run.final_checkpoint}/{MODEL_FILE}")
    assert torch.equal(model.transformer.wte.weight, final["transformer.wte.weight"])


def test_generate_samples_with_temperature_top_k_top_p(finished_run, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = [finished_run.final_model, "--prompt", "def main(", "--max-new-tokens", "12", "--temperature", "0.9",
            "--top-k", "20", "--top-p", "0.9", "--num-samples", "2", "--seed", "3"]
    assert generate_cli.main(args) == 0
    first = capsys.readouterr().out
    generate_cli.main(args)
    assert capsys.readouterr().out == first                 # the seed fixes the samples
    assert first.count("--- sample") == 2 and first.count("def main(") == 2
    generate_cli.main(args[:-1] + ["4"])
    assert capsys.readouterr().out != first


def test_generate_refuses_bad_flags_and_pickled_weights(finished_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        generate_cli.main([finished_run.final_model, "--top-p", "1.5", "--temperature", "-1"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--top-p 1.5" in err and "--temperature -1" in err
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(SystemExit):
        generate_cli.main([str(tmp_path), "--prompt", "x"])
    assert "only safetensors weights are loaded" in capsys.readouterr().err


def test_load_checkpoint_of_the_final_checkpoint_matches_the_exported_model(finished_run, tiny_base_cfg):
    from transformers import AutoModelForCausalLM

    from trainer.model import build_model, build_optimizer

    model = build_model(tiny_base_cfg, 512, 0)
    state, config = load_checkpoint(finished_run.final_checkpoint, model=model,
                                    optimizer=build_optimizer(model, tiny_base_cfg),
                                    scaler=torch.amp.GradScaler("cpu", enabled=False))
    exported = AutoModelForCausalLM.from_pretrained(finished_run.final_model)
    assert state.step == finished_run.steps and config["epochs"] == 1
    for (name, a), b in zip(model.state_dict().items(), exported.state_dict().values(), strict=True):
        assert torch.equal(a, b), name

"""ONNX export checked in onnxruntime, and dynamic int8 inference: the model a run exports
(final_model/) in two more forms, each loaded back and compared with PyTorch's fp32 logits."""
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer import export as export_cli
from trainer import generate as generate_cli
from trainer.export import export_hf
from trainer.export.int8 import INT8_MARKER, WEIGHTS_FILE, quantize
from trainer.model import build_model
from trainer.export.inference import load_model_dir
from trainer.export.model_dir import is_int8
from trainer.export.onnx_export import OPSET, onnx_logits, onnx_session

pytest.importorskip("onnxruntime", reason="pip install -e '.[onnx]'")


@pytest.fixture(scope="module")
def final_model(tiny_base_cfg, tiny_data, tmp_path_factory):
    """A real final_model/ directory: config, safetensors weights, the run's tokenizer."""
    torch.manual_seed(1)
    model = build_model(tiny_base_cfg.replace(n_layer=2), tiny_data.vocab_size, tiny_data.tokenizer.eos_token_id)
    with torch.no_grad():     # weights away from their initialisation, so int8 has something to round
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return export_hf(model, tiny_data.tokenizer, tiny_base_cfg, tmp_path_factory.mktemp("run") / "final_model")


def fp32_logits(model_dir: Path, ids: torch.Tensor) -> np.ndarray:
    model, _ = load_model_dir(model_dir)
    with torch.no_grad():
        return model(input_ids=ids).logits.numpy()


def test_the_onnx_model_gives_pytorchs_logits_for_any_batch_and_length(final_model, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    assert export_cli.main(["onnx", str(final_model), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"opset {OPSET}" in printed and "max |difference|" in printed
    session = onnx_session(out)
    context = 32
    for shape in [(1, 1), (3, 7), (2, context)]:        # dynamic batch and sequence axes
        ids = torch.randint(0, 512, shape, generator=torch.Generator().manual_seed(sum(shape)))
        np.testing.assert_allclose(onnx_logits(session, ids), fp32_logits(final_model, ids), atol=1e-4, rtol=0)


def test_int8_keeps_the_integers_it_was_exported_with_and_generate_loads_it(final_model, tmp_path, capsys):
    out = tmp_path / "int8"
    assert export_cli.main(["int8", str(final_model), "--out", str(out)]) == 0
    assert is_int8(out) and (out / INT8_MARKER).is_file() and not (out / "model.safetensors").exists()
    assert (out / WEIGHTS_FILE).stat().st_size < (final_model / "model.safetensors").stat().st_size
    loaded, _ = load_model_dir(out)
    linear = torch.ao.nn.quantized.dynamic.Linear
    assert sum(isinstance(m, linear) for m in loaded.modules()) == 2 * 4 + 1   # 4 per block + the output layer
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    fp32, _ = load_model_dir(final_model)
    with torch.no_grad():
        again = quantize(fp32)(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
        exact = fp32(input_ids=ids).logits
    assert torch.equal(got, again)                                  # rebuilt from the saved integers
    assert 0 < (got - exact).abs().max() < 0.1 * exact.abs().max()  # rounded, but close
    capsys.readouterr()
    assert generate_cli.main([str(out), "--prompt", "def ", "--max-new-tokens", "5", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("def ")


@pytest.mark.parametrize("argv,message", [
    (["onnx", "{missing}", "--out", "{tmp}/m.onnx"], "no config.json"),
    (["int8", "{model}", "--out", "{model}"], "already exists"),
    (["onnx", "{model}", "--out", "{tmp}/no/such/m.onnx"], "does not exist; create it first"),
])
def test_bad_export_targets_exit_2_and_write_nothing(final_model, tmp_path, capsys, argv, message):
    values = {"missing": str(tmp_path / "missing"), "tmp": str(tmp_path), "model": str(final_model)}
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as exit_info:
        export_cli.main([a.format(**values) for a in argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_generation_stops_at_the_models_context_instead_of_failing(final_model, tiny_data):
    from trainer.generate import generate

    (text,) = generate(str(final_model), "def " * 50, max_new_tokens=100, temperature=0)  # context: 32
    assert len(tiny_data.tokenizer(text).input_ids) <= 32

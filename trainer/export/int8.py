"""Dynamic int8 quantization of a trained model's Linear layers, for inference on the CPU.

GPT-2's blocks use transformers' ``Conv1D`` (a Linear with its weight transposed), which
PyTorch's quantizer does not know; they are turned into ``nn.Linear`` first (a Llama's layers
are nn.Linear already; its RMSNorms, like GPT-2's LayerNorms, stay fp32). Then
``torch.ao.quantization.quantize_dynamic`` stores each Linear weight as int8 with one scale
(per tensor, symmetric) and quantizes activations on the fly. Embeddings and layer norms stay
fp32, so the tied output layer gets its own int8 copy of the token embedding.

On disk (``python -m trainer.export int8``): the model's config.json and tokenizer files,
``model.int8.safetensors`` (int8 weights with their scales and zero points, the rest fp32)
and ``quantization.json``. Loading rebuilds the quantized modules from those exact integers,
so a loaded model computes what the exported one did.
"""
from __future__ import annotations

import copy
import json
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from trainer.errors import CheckpointError
from trainer.files import TMP_PREFIX, atomic_write_json
from trainer.export.model_dir import INT8_MARKER, INT8_WEIGHTS as WEIGHTS_FILE

METHOD = "torch.ao.quantization.quantize_dynamic, qint8 per-tensor weights, Linear layers"
_INT8, _SCALE, _ZERO = ".weight.int8", ".weight.scale", ".weight.zero_point"


def _quantized_linear():
    from torch.ao.nn.quantized.dynamic import Linear
    return Linear


def conv1d_to_linear(module: torch.nn.Module) -> None:
    """Replace every transformers Conv1D below ``module`` by the equivalent nn.Linear, in place."""
    from transformers.pytorch_utils import Conv1D

    for name, child in module.named_children():
        if isinstance(child, Conv1D):
            n_in, n_out = child.weight.shape
            linear = torch.nn.Linear(n_in, n_out)
            with torch.no_grad():
                linear.weight.copy_(child.weight.t())
                linear.bias.copy_(child.bias)
            setattr(module, name, linear)
        else:
            conv1d_to_linear(child)


def quantize(model: torch.nn.Module) -> torch.nn.Module:
    """An int8 copy of ``model`` (the original is left as it was)."""
    model = copy.deepcopy(model).float().eval()
    conv1d_to_linear(model)
    return _quantize_linears(model)


def _quantize_linears(model: torch.nn.Module) -> torch.nn.Module:
    with warnings.catch_warnings():
        # torch.ao.quantization warns that it will move to torchao; it is what this torch ships.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def int8_tensors(qmodel: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What save_file stores: int8 weights with scale and zero point, every other tensor as is."""
    linear = _quantized_linear()
    tensors: dict[str, torch.Tensor] = {}
    for name, module in qmodel.named_modules():
        if isinstance(module, linear):
            weight, bias = module.weight(), module.bias()
            tensors[name + _INT8] = weight.int_repr().contiguous()
            tensors[name + _SCALE] = torch.tensor([weight.q_scale()], dtype=torch.float64)
            tensors[name + _ZERO] = torch.tensor([weight.q_zero_point()], dtype=torch.int64)
            if bias is not None:
                tensors[name + ".bias"] = bias.detach().contiguous()
    for key, value in qmodel.state_dict().items():
        if isinstance(value, torch.Tensor) and "_packed_params" not in key:
            tensors[key] = value.detach().contiguous()
    return tensors


def save_int8(model: torch.nn.Module, model_dir: Path, out: Path) -> Path:
    """Quantize ``model``, loaded from ``model_dir`` (a final_model/), into the new directory ``out``;
    the tokenizer and config files are copied from ``model_dir``."""
    qmodel = quantize(model)
    out = Path(out)
    tmp = out.with_name(f"{TMP_PREFIX}{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(model_dir, tmp, ignore=shutil.ignore_patterns("model.safetensors", "*.bin", TMP_PREFIX + "*"))
    save_file(int8_tensors(qmodel), str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "method": METHOD})
    modules = sorted(n for n, m in qmodel.named_modules() if isinstance(m, _quantized_linear()))
    atomic_write_json(tmp / INT8_MARKER, {"method": METHOD, "torch": torch.__version__,
                                          "source": str(model_dir), "quantized_modules": modules})
    tmp.rename(out)
    return out


def load_int8(model_dir: Path) -> torch.nn.Module:
    """Rebuild the quantized model from ``model_dir`` exactly as it was saved."""
    from transformers import AutoConfig, AutoModelForCausalLM

    info = json.loads((Path(model_dir) / INT8_MARKER).read_text())
    quantized = set(info["quantized_modules"])
    tensors = load_file(str(Path(model_dir) / WEIGHTS_FILE))
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir, local_files_only=True))
    conv1d_to_linear(model)
    plain = {k: v for k, v in tensors.items() if k.rsplit(".", 1)[0] not in quantized
             and k.rsplit(".", 2)[0] not in quantized}
    missing, unexpected = model.load_state_dict(plain, strict=False)
    missing = [k for k in missing if k.rsplit(".", 1)[0] not in quantized]
    if missing or unexpected or any(n + _INT8 not in tensors for n in quantized):
        raise CheckpointError(f"MODEL_DIR {str(model_dir)!r}: {WEIGHTS_FILE} does not match its config.json "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]}); export it again")
    model.tie_weights = lambda *a, **k: None    # the int8 output layer has its own copy of the embedding
    qmodel = _quantize_linears(model.eval())
    modules = dict(qmodel.named_modules())
    for name in quantized:       # the exact integers, not a re-quantization of fp32 weights
        weight = torch._make_per_tensor_quantized_tensor(
            tensors[name + _INT8], float(tensors[name + _SCALE]), int(tensors[name + _ZERO]))
        modules[name].set_weight_bias(weight, tensors.get(name + ".bias"))
    return qmodel

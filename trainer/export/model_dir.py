"""What a model directory the trainer wrote looks like, checked without importing torch.

Two kinds: ``final_model/`` (Hugging Face format: config.json, model.safetensors, tokenizer)
and its int8 form from ``python -m trainer.export int8`` (model.int8.safetensors and
quantization.json instead of model.safetensors). Only safetensors weights are ever read: a
``pytorch_model.bin`` is a pickle, which can run code when loaded, and a model directory may
come from anywhere (a Kaggle dataset, a download). Loading is ``trainer.export.inference``.
"""
from __future__ import annotations

from pathlib import Path

FP32_WEIGHTS = "model.safetensors"
INT8_WEIGHTS = "model.int8.safetensors"
INT8_MARKER = "quantization.json"     # present only in an int8 directory


def is_int8(model_dir: str | Path) -> bool:
    return (Path(model_dir) / INT8_MARKER).is_file()


def model_dir_problem(model_dir: str | Path, what: str = "MODEL_DIR") -> str | None:
    """Why ``model_dir`` is not a model directory that can be loaded, naming ``what``; or None."""
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        return (f"{what} {str(model_dir)!r}: no config.json there; pass a final_model/ directory written by "
                "python -m trainer (or its int8 form from python -m trainer.export int8)")
    weights = INT8_WEIGHTS if is_int8(path) else FP32_WEIGHTS
    if not (path / weights).is_file():
        return (f"{what} {str(model_dir)!r}: no {weights} there; only safetensors weights are loaded "
                "(a pytorch_model.bin is a pickle, which can run code when loaded)")
    return None

"""Reading a model directory the trainer wrote: ``final_model/`` (Hugging Face format) or its
int8 form (``python -m trainer.export int8``).

Only safetensors weights are read: a ``pytorch_model.bin`` is a pickle, which can run code
when loaded, and a model directory may come from anywhere (a Kaggle dataset, a download).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from trainer.errors import CheckpointError
from trainer.int8 import INT8_MARKER, WEIGHTS_FILE as INT8_WEIGHTS

if TYPE_CHECKING:   # torch and transformers load only when a model does
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast



def check_model_dir(model_dir: str | Path, what: str = "MODEL_DIR") -> Path:
    """The directory as a Path, or a CheckpointError naming ``what``, the value and the fix."""
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{what} {str(model_dir)!r}: no config.json there; pass a final_model/ directory "
                              "written by python -m trainer (or its int8 form from python -m trainer.export int8)")
    weights = INT8_WEIGHTS if is_int8(path) else "model.safetensors"
    if not (path / weights).is_file():
        raise CheckpointError(f"{what} {str(model_dir)!r}: no {weights} there; only safetensors weights are "
                              "loaded (a pytorch_model.bin is a pickle, which can run code when loaded)")
    return path


def is_int8(model_dir: str | Path) -> bool:
    return (Path(model_dir) / INT8_MARKER).is_file()


def load_model_dir(model_dir: str | Path) -> tuple["GPT2LMHeadModel", "PreTrainedTokenizerFast"]:
    """The model (in eval mode, on the CPU) and its tokenizer; int8 directories included."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = check_model_dir(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if is_int8(path):
        from trainer.int8 import load_int8
        return load_int8(path), tokenizer
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, use_safetensors=True)
    return model.eval(), tokenizer

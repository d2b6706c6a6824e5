"""Loading a model directory for inference: final_model/ in fp32, or its int8 form."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from trainer.errors import CheckpointError
from trainer.export.model_dir import is_int8, model_dir_problem

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast


def load_model_dir(model_dir: str | Path) -> tuple["PreTrainedModel", "PreTrainedTokenizerFast"]:
    """The model (a GPT-2 or a Llama, eval mode, on the CPU) and its tokenizer. Raises CheckpointError
    on a bad folder. The model's vocabulary may be padded past the tokenizer's (trainer.model.padded_vocab):
    logits have a column for each padded id, which trainer.generate suppresses."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if problem := model_dir_problem(model_dir):
        raise CheckpointError(problem)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    if is_int8(model_dir):
        from trainer.export.int8 import load_int8
        return load_int8(Path(model_dir)), tokenizer
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, use_safetensors=True)
    return model.eval(), tokenizer

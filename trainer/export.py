"""Exports: the Hugging Face model directory that transformers loads offline."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

from trainer.config import TrainConfig

TRAINING_CONFIG_FILE = "training_config.json"


def export_hf(model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast, cfg: TrainConfig,
              out: Path) -> Path:
    """Write config.json, model.safetensors, tokenizer files and training_config.json to ``out``.

    Written beside ``out`` first and renamed into place, so ``out`` is always complete.
    """
    out = Path(out)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / TRAINING_CONFIG_FILE).write_text(json.dumps({"config": cfg.to_dict()}, indent=1, sort_keys=True))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out

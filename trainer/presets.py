"""Named starting points for a run. A preset is a partial config: the flags and the
--config file given on the command line override it."""
from __future__ import annotations

from typing import Any

from trainer.errors import ConfigError

# The recipe every preset trains with: Llama blocks and Muon for their matrices (issue 29). On this
# project's 2-core CPU, `python -m bench quality` measured it reaching the plain AdamW + GPT-2 loop's
# 3-minute bits per byte in 0.55 of that loop's time and ending 6.5% lower (docs/benchmarks.md, part
# 10). The reference notebooks' recipe stays one flag pair away: --optimizer adamw --arch gpt2.
RECIPE = dict(optimizer="muon", arch="llama")

PRESETS: dict[str, dict[str, Any]] = {
    # The default without a GPU: a 10-trial study finishes in under 10 minutes on 2 CPU cores.
    # The corpus is a fixed 12% of the standard library's sources (~1.3 MB of Python), the
    # model is small enough to see each training token twice in ~30 s.
    "quick": dict(
        **RECIPE, subset=0.12, vocab_size=2048,
        n_layer=2, n_embd=128, n_head=4, block_size=128, dropout=0.0,
        lr=2e-3, min_lr_ratio=0.1, warmup_steps=30, weight_decay=0.1, beta2=0.99,
        micro_batch=16, grad_accum=1, epochs=2, eval_every=50, eval_batches=16,
        save_every=0,
    ),
    # The default on a CUDA GPU, following the reference Kaggle notebook for a 16 GB T4.
    "kaggle-t4": dict(
        **RECIPE, dataset="wikitext", dataset_config="wikitext-103-raw-v1", tokenizer="gpt2",
        n_layer=8, n_embd=256, n_head=8, block_size=512, dropout=0.1,
        micro_batch=8, grad_accum=8, lr=5e-4, warmup_steps=500, weight_decay=0.01,
        grad_clip=1.0, beta1=0.9, beta2=0.999, epochs=3, eval_every=1000, save_every=1000,
        eval_batches=200,
    ),
}

# The memory guide's low-memory setting: a quarter of the activations of kaggle-t4's
# micro-batch and half its context, the same effective batch (4 x 4 = 16 sequences of 256),
# and checkpoints without the AdamW state (a third of the size; a resume restarts the optimizer).
PRESETS["low-memory"] = {**PRESETS["kaggle-t4"], "micro_batch": 4, "grad_accum": 4, "block_size": 256,
                         "precision": "auto", "save_optimizer_state": False}

# The Colab notebook's training modes, for one T4 on WikiText-103: time against quality.
_WIKITEXT = dict(**RECIPE, dataset="wikitext", dataset_config="wikitext-103-raw-v1", tokenizer="gpt2",
                 grad_clip=1.0, beta1=0.9, beta2=0.999, weight_decay=0.01, save_on_eval=False)
PRESETS["fast"] = {**_WIKITEXT, "n_layer": 4, "n_embd": 256, "n_head": 4, "block_size": 256, "dropout": 0.1,
                   "micro_batch": 16, "grad_accum": 2, "lr": 1e-3, "warmup_steps": 200, "epochs": 1,
                   "eval_every": 500, "save_every": 500, "eval_batches": 100}
PRESETS["balanced"] = {**_WIKITEXT, "n_layer": 6, "n_embd": 384, "n_head": 6, "block_size": 512, "dropout": 0.1,
                       "micro_batch": 8, "grad_accum": 8, "lr": 6e-4, "warmup_steps": 500, "epochs": 2,
                       "eval_every": 1000, "save_every": 1000, "eval_batches": 200}
PRESETS["quality"] = {**_WIKITEXT, "n_layer": 8, "n_embd": 512, "n_head": 8, "block_size": 1024, "dropout": 0.1,
                      "micro_batch": 4, "grad_accum": 16, "lr": 3e-4, "warmup_steps": 1000, "epochs": 3,
                      "eval_every": 1000, "save_every": 1000, "eval_batches": 200}


def default_preset() -> str:
    import torch  # here, not at the top: --help must not wait for torch

    return "kaggle-t4" if torch.cuda.is_available() else "quick"


def preset_values(name: str | None) -> dict[str, Any]:
    """The settings of a preset; None picks the default for this machine."""
    name = name or default_preset()
    if name not in PRESETS:
        raise ConfigError([f"--preset {name!r}: unknown preset; choose one of {', '.join(PRESETS)}"])
    return dict(PRESETS[name])

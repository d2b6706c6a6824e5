"""The sizes of bench.quality's comparison: the model, batch, evaluation and budgets, by device.

On the CPU (``FULL``) a small GPT-2-sized model in fp32; on a GPU (``GPU``) the kaggle-t4 preset's
model and micro-batch in fp16, as a T4 trains; ``SMOKE`` and ``GPU_SMOKE`` are seconds' worth, to check
the code runs. ``Sizes.config`` is the shared config every contender starts from.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from trainer.config import TrainConfig
from trainer.presets import PRESETS

NO_EVAL = 10 ** 9            # the loops' own eval_every: the bench evaluates every model itself
WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"


@dataclass(frozen=True)
class Sizes:
    subset: float = 1.0          # the whole offline corpus (~3M tokens): the default budgets see each block once
    vocab_size: int = 4096
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    block_size: int = 128
    micro_batch: int = 16        # 2,048 tokens per optimizer step, for every contender
    eval_every: int = 50         # optimizer steps between evaluations, the same for all
    eval_batches: int = 10       # validation micro-batches per evaluation: 160 blocks of 128 tokens
    calibration_warmup: int = 3  # steps before the timed calibration steps
    calibration_steps: int = 15  # their median time sets each contender's schedule (planned_steps)
    budgets_min: tuple[float, ...] = (1.0, 2.0, 3.0)
    device: str = "cpu"          # "cuda": cuda:0
    precision: str = "fp32"      # every contender's: fp32 on the CPU, fp16 (a T4's) on a GPU

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch * self.block_size

    def config(self, cache_dir: str, corpus: str) -> TrainConfig:
        """The shared config: TrainConfig's defaults (today's recipe), these sizes, device and precision."""
        sizes = {k: getattr(self, k) for k in ("subset", "vocab_size", "n_layer", "n_embd", "n_head",
                                               "block_size", "micro_batch", "eval_batches")}
        source = {"dataset": str(wikitext_dir(cache_dir))} if corpus == "wikitext" else {}
        return TrainConfig.from_dict({**sizes, **source, "device": self.device, "precision": self.precision,
                                      "progress": False,
                                      "eval_every": NO_EVAL, "save_every": 0, "epochs": 10_000,
                                      "cache_dir": cache_dir}).check()


FULL = Sizes()
SMOKE = Sizes(subset=0.03, vocab_size=512, n_layer=1, n_embd=32, n_head=2, block_size=32, micro_batch=8,
              eval_every=20, eval_batches=2, calibration_warmup=1, calibration_steps=3, budgets_min=(0.02, 0.04))
_T4 = PRESETS["kaggle-t4"]
# The kaggle-t4 model and micro-batch (4,096 tokens per step; no accumulation: more steps in a short
# budget), fp16 as a T4 trains. The corpus and BPE of bench.gpu (a third of the offline corpus, 32,000
# tokens): .ci/gpu-check runs that part first with the same --cache-dir, so the tokenizer is cached.
# The rest is TrainConfig's defaults, as on the CPU (no dropout: the preset's 0.1 is for epochs of
# WikiText-103, not minutes), so (c) is today's recipe at this size.
GPU = Sizes(subset=0.3, vocab_size=32000, n_layer=_T4["n_layer"], n_embd=_T4["n_embd"], n_head=_T4["n_head"],
            block_size=_T4["block_size"], micro_batch=_T4["micro_batch"], eval_every=50, eval_batches=20,
            calibration_warmup=5, calibration_steps=20, device="cuda", precision="fp16")
GPU_SMOKE = replace(SMOKE, device="cuda", precision="fp16")


def sizes_for(smoke: bool, device: str, budgets: tuple[float, ...] | None = None) -> Sizes:
    """The sizes of a run: by device and --smoke, with --budgets (minutes) over their own."""
    sizes = {("cpu", False): FULL, ("cpu", True): SMOKE, ("cuda", False): GPU, ("cuda", True): GPU_SMOKE}[
        device, smoke]
    return replace(sizes, budgets_min=tuple(sorted(budgets))) if budgets else sizes


def wikitext_dir(cache_dir: str) -> Path:
    """WikiText-2 as a local dataset directory: valid.txt trains, test.txt is the held-out split
    (../shared/data/README.md's suggestion); links, so nothing is copied."""
    if not (WIKITEXT / "valid.txt").is_file():
        raise FileNotFoundError(f"--corpus wikitext: {WIKITEXT} holds no valid.txt; use --corpus offline")
    folder = Path(cache_dir) / "wikitext-2"
    folder.mkdir(parents=True, exist_ok=True)
    for name, source in (("train.txt", "valid.txt"), ("validation.txt", "test.txt")):
        if not (folder / name).exists():
            (folder / name).symlink_to(WIKITEXT / source)
    return folder

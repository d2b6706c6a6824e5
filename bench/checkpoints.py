"""Checkpoints and exports on the kaggle-t4 model shape, with AdamW state populated.

Stall: how long the training thread is blocked by one save. The trainer saves in the
background (``trainer.checkpoints.writer.BackgroundWriter``: the training thread only copies the state into
reused host buffers; a thread writes the atomic directory of safetensors + JSON + sha256
manifest, every file fsynced). Against it: nanoGPT's ``torch.save({"model", "optimizer"})``
into the page cache, the same followed by an fsync (the durability the trainer's files get),
and the trainer's own synchronous ``save_checkpoint``. Export: the trainer's JSON export of
the weights (``trainer.checkpoints.export_json``, base64 of the raw bytes) and its Hugging Face
export against the lists-of-floats JSON ``json.dump({k: t.tolist()})``.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from bench.common import alternate, part, ratio, row
from trainer.config import TrainConfig
from trainer.presets import PRESETS


@dataclass(frozen=True)
class Sizes:
    n_layer: int = 8
    n_embd: int = 256
    n_head: int = 8
    block_size: int = 512
    vocab_size: int = 50257       # the GPT-2 tokenizer's
    lists_repeats: int = 1        # the lists-of-floats JSON takes most of a minute: measured this often


FULL = Sizes()
SMOKE = Sizes(n_layer=1, n_embd=32, n_head=2, block_size=32, vocab_size=512)


def build(sizes: Sizes):
    """Model and AdamW after one step on random tokens, so the optimizer state is full size."""
    from trainer.model import build_model, build_optimizer

    cfg = TrainConfig(**{**PRESETS["kaggle-t4"], "n_layer": sizes.n_layer, "n_embd": sizes.n_embd,
                         "n_head": sizes.n_head, "block_size": sizes.block_size})
    model = build_model(cfg, sizes.vocab_size, sizes.vocab_size - 1)
    optimizer = build_optimizer(model, cfg)
    x = torch.randint(sizes.vocab_size, (2, min(64, sizes.block_size)))
    model(input_ids=x, labels=x).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return cfg, model, optimizer


def dir_size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class Saves:
    """The contenders, each writing into a fresh path under ``work`` and removing the last one."""

    def __init__(self, work: Path, cfg: TrainConfig, model, optimizer):
        from trainer.checkpoints.writer import BackgroundWriter

        self.work, self.cfg, self.model, self.optimizer = work, cfg, model, optimizer
        self.writer = BackgroundWriter()
        self.sizes: dict[str, int] = {}
        self.durable: list[float] = []          # background save: until the files are on disk
        self.n = 0

    def _fresh(self, name: str) -> Path:
        self.n += 1
        path = self.work / f"{name}-{self.n}"
        for old in self.work.glob(f"{name}-*"):
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        return path

    def _timed(self, name: str, save: Callable[[Path], Any]) -> float:
        path = self._fresh(name)
        start = time.perf_counter()
        save(path)
        seconds = time.perf_counter() - start
        self.sizes[name] = dir_size(path)
        return seconds

    def _capture_args(self) -> dict[str, Any]:
        from trainer.state import TrainState
        return dict(model=self.model, optimizer=self.optimizer, scaler=torch.amp.GradScaler("cpu", enabled=False),
                    state=TrainState(step=1), config=self.cfg.to_dict(), kind="periodic")

    def trainer_background(self) -> float:
        """The stall the training thread sees; the write is then waited for, untimed for the stall."""
        from trainer.checkpoints.capture import capture
        from trainer.checkpoints.format import publish

        path = self._fresh("background")
        start = time.perf_counter()
        stalled = self.writer.save(path, lambda buffers: capture(**self._capture_args(), buffers=buffers))
        outcome = self.writer.drain()[-1]
        self.durable.append(time.perf_counter() - start)
        if outcome.error:
            raise outcome.error
        publish(outcome)      # the rename the trainer does once the run's rows are recorded
        self.sizes["background"] = dir_size(path)
        return stalled

    def trainer_sync(self) -> float:
        from trainer.checkpoints import save_checkpoint
        return self._timed("trainer_sync", lambda p: save_checkpoint(p, **self._capture_args()))

    def torch_save(self, fsync: bool) -> float:
        def save(path: Path) -> None:
            with open(path, "wb") as f:
                torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}, f)
                if fsync:
                    f.flush()
                    os.fsync(f.fileno())
        return self._timed("torch_save_fsync" if fsync else "torch_save", save)

    def hf_export(self, tokenizer) -> float:
        from trainer.export import export_hf
        return self._timed("hf_export", lambda p: export_hf(self.model, tokenizer, self.cfg, p))

    def trainer_json(self, checkpoint: Path, weights_only: bool) -> float:
        from trainer.checkpoints import export_json
        name = "json_weights" if weights_only else "json_full"
        return self._timed(name, lambda p: export_json(checkpoint, p, weights_only=weights_only))

    def lists_of_floats(self) -> float:
        """Every weight once (GPT-2's lm_head is its wte, as in the trainer's exports)."""
        from trainer.checkpoints.capture import unique_state_dict

        def save(path: Path) -> None:
            with open(path, "w") as f:
                json.dump({k: t.tolist() for k, t in unique_state_dict(self.model).items()}, f)
        return self._timed("lists_json", save)


def has_json_export() -> bool:
    return importlib.util.find_spec("trainer.checkpoints.portable") is not None


def tiny_tokenizer():
    """A byte-level tokenizer for export_hf, trained in memory (the export writes its files)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(["def main():\n    return 0\n"] * 10,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


STALLS = {"trainer background save": "background", "trainer save_checkpoint (synchronous)": "trainer_sync",
          "torch.save": "torch_save", "torch.save + fsync": "torch_save_fsync"}
EXPORTS = {"trainer export_json, weights": "json_weights", "trainer export_json, with optimizer": "json_full",
           "trainer export_hf (safetensors)": "hf_export", "lists-of-floats JSON, weights": "lists_json"}


def run(repeats: int, smoke: bool, log: Callable[[str], None] = print) -> dict[str, Any]:
    sizes = SMOKE if smoke else FULL
    cfg, model, optimizer = build(sizes)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"checkpoints: {n_params:,} parameters, AdamW state populated")
    work = Path(tempfile.mkdtemp(prefix="bench-ckpt-"))
    try:
        saves = Saves(work, cfg, model, optimizer)
        saves.trainer_background()          # the first save allocates the host buffers; later ones reuse them
        saves.durable.clear()
        stalls = alternate({"trainer background save": saves.trainer_background,
                            "trainer save_checkpoint (synchronous)": saves.trainer_sync,
                            "torch.save": lambda: saves.torch_save(False),
                            "torch.save + fsync": lambda: saves.torch_save(True)}, repeats, log)
        checkpoint = work / "source-checkpoint"
        shutil.copytree(next(work.glob("trainer_sync-*")), checkpoint)
        tokenizer = tiny_tokenizer()
        contenders = {"trainer export_hf (safetensors)": lambda: saves.hf_export(tokenizer)}
        if has_json_export():
            contenders = {"trainer export_json, weights": lambda: saves.trainer_json(checkpoint, True),
                          "trainer export_json, with optimizer": lambda: saves.trainer_json(checkpoint, False),
                          **contenders}
        exports = alternate(contenders, repeats, log)
        exports.update(alternate({"lists-of-floats JSON, weights": saves.lists_of_floats},
                                 min(repeats, sizes.lists_repeats), log))
        sizes_mb = {k: v / 1e6 for k, v in saves.sizes.items()}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report(sizes, n_params, stalls, saves.durable, exports, sizes_mb, repeats, smoke)


def report(sizes: Sizes, n_params: int, stalls: dict, durable: list[float], exports: dict,
           sizes_mb: dict[str, float], repeats: int, smoke: bool) -> dict[str, Any]:
    rows = [row(f"stall: {k}", v, "s", higher_is_better=False) for k, v in stalls.items()]
    rows.append(row("trainer background save, until written and fsynced", durable, "s", higher_is_better=False,
                    note="off the training thread after the stall"))
    rows += [row(f"write: {k}", v, "s", higher_is_better=False) for k, v in exports.items()]
    labels = {**STALLS, **EXPORTS}
    rows += [row(f"size: {k}", [sizes_mb[labels[k]]], "MB", higher_is_better=False)
             for k in list(stalls) + list(exports) if labels[k] in sizes_mb]
    background, lists = stalls["trainer background save"], exports["lists-of-floats JSON, weights"]
    ratios = [ratio("stall: trainer background save / torch.save", background, stalls["torch.save"]),
              ratio("stall: trainer background save / torch.save + fsync", background, stalls["torch.save + fsync"]),
              ratio("stall: trainer save_checkpoint (synchronous) / torch.save + fsync",
                    stalls["trainer save_checkpoint (synchronous)"], stalls["torch.save + fsync"])]
    if "trainer export_json, weights" in exports:      # lists_repeats differs: a ratio of medians
        mine = exports["trainer export_json, weights"]
        ratios += [ratio("write time: lists-of-floats JSON / trainer export_json (weights)", lists, mine),
                   ratio("size: lists-of-floats JSON / trainer export_json (weights)", [sizes_mb["lists_json"]],
                         [sizes_mb["json_weights"]])]
    notes = ["reference for the lists-of-floats JSON of the kaggle-t4 weights: 18.6 s and 433 MB"]
    if "trainer export_json, weights" not in exports:
        notes.append("the trainer has no JSON export (trainer.checkpoints.portable) in this checkout: not measured")
    return part(
        "Checkpoints and exports", settings={**asdict(sizes), "n_params": n_params},
        method=("wall time of the save call on the training thread (the stall); fresh path each time, the "
                "previous one deleted and any background write finished, untimed; rounds alternate. "
                "Sizes are bytes on disk / 1e6"),
        rows=rows, ratios=ratios, notes=notes, repeats=repeats, smoke=smoke)

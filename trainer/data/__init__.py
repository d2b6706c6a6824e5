"""The data room's front door: everything the training loop needs from the data side, prepared
once (``prepare_data``): source -> tokenizer -> cached token streams. The pieces live in
``sources``, ``tokenizer`` and ``tokens``; ``batches`` cuts the streams into blocks and
``text_measure`` counts the bytes and words a block's tokens stand for.

Every check of the data (readable, decodable, the text column, enough tokens for a training
step and a validation block) passes before the first write to --cache-dir: the corpus is read
without a cache, and a new tokenizer and new token streams are held in memory until then."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from trainer.data.sources import load_corpus
from trainer.data.tokens import find_stream
from trainer.errors import DataError

if TYPE_CHECKING:   # transformers is imported with the tokenizer: the room's light modules stay light
    from transformers import PreTrainedTokenizerFast


@dataclass(frozen=True)
class PreparedData:
    train: np.ndarray            # 1-D uint16 token stream (read-only memmap), documents joined by EOS
    val: np.ndarray              # the same for validation
    tokenizer: PreTrainedTokenizerFast   # eos_token "<|endoftext|>"; save_pretrained works
    dataset_identity: dict       # {"source", "train": {"documents", "bytes", "sha256"}, "val", "subset"}
    tokenizer_identity: dict     # {"kind": "bpe"|"pretrained", "name", "vocab_size", "sha256"}

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)


def prepare_data(cfg, log: Callable[[str], None] = print) -> PreparedData:
    """Read the corpus ``cfg`` names, load or train its tokenizer, load or build its token streams.

    Raises ``trainer.errors.DataError`` with the flag, the value and the fix when a source is
    missing, empty, unreadable or unreachable, or too small for ``cfg``'s batch and context,
    having written nothing.
    """
    start = time.perf_counter()
    corpus = load_corpus(cfg)
    t, v = corpus.train, corpus.val
    log(f"data: {corpus.source}: {t.documents} training documents ({t.bytes / 1e6:.1f} MB"
        f"{f', subset {cfg.subset:g}' if cfg.subset < 1 else ''}), {v.documents} validation "
        f"documents ({v.bytes / 1e6:.1f} MB), read in {time.perf_counter() - start:.1f}s")
    from trainer.data.tokenizer import load_tokenizer
    tokenizer, tokenizer_identity, save_tokenizer = load_tokenizer(cfg, t, log)
    sha = tokenizer_identity["sha256"]
    found = [find_stream(split, tokenizer, sha, cfg.cache_dir, name) for name, split in (("train", t), ("val", v))]
    check_enough_tokens(cfg, len(found[0]), len(found[1]))
    save_tokenizer()                     # the first write, every check passed
    train, val = (stream.save(log) for stream in found)
    log(f"data: ready in {time.perf_counter() - start:.1f}s: {len(train):,} training and "
        f"{len(val):,} validation tokens, vocab {len(tokenizer)}")
    return PreparedData(train, val, tokenizer, corpus.identity(), tokenizer_identity)


def check_enough_tokens(cfg, train_tokens: int, val_tokens: int) -> None:
    """Raise DataError unless the training split fills one optimizer step of ``cfg``'s blocks
    (all processes of a torchrun launch together) and the validation split one block: what
    the trainer's loop needs (trainer.data.batches cuts blocks of block_size + 1 tokens)."""
    from trainer.batching import Batching
    from trainer.distributed import World

    what = data_source_label(cfg)
    world = World.from_env().size
    blocks, need = max(0, (train_tokens - 1) // cfg.block_size), Batching.from_config(cfg, world).per_step
    if blocks < need:
        ranks = f" x {world} processes" if world > 1 else ""
        raise DataError(f"{what}: the training split has {train_tokens:,} tokens, {blocks} blocks of --block-size "
                        f"{cfg.block_size}, fewer than one optimizer step needs ({need}: --micro-batch "
                        f"{cfg.micro_batch} x --grad-accum {cfg.grad_accum}{ranks}); nothing was written. Pass "
                        "more text, or a smaller --block-size or --micro-batch")
    if val_tokens < cfg.block_size + 1:
        raise DataError(f"{what}: the validation split has {val_tokens:,} tokens, fewer than one block of "
                        f"--block-size {cfg.block_size} needs ({cfg.block_size + 1}); nothing was written. Pass "
                        f"more text, a larger --val-fraction (now {cfg.val_fraction:g}) or a smaller --block-size")


def data_source_label(cfg) -> str:
    """The flag and value that name ``cfg``'s corpus, for messages."""
    if cfg.data_files:
        return f"--data-files {' '.join(map(repr, cfg.data_files))}"
    if cfg.dataset:
        return f"--dataset {cfg.dataset!r}"
    return "the standard library's sources (the default corpus)"

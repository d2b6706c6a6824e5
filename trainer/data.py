"""Everything the training loop needs from the data side, prepared once: source -> tokenizer ->
cached token streams. The pieces live in ``sources``, ``tokenizer`` and ``tokens``."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
from transformers import PreTrainedTokenizerFast

from trainer.sources import load_corpus
from trainer.tokenizer import load_tokenizer
from trainer.tokens import token_stream


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
    missing, empty or unreachable.
    """
    start = time.perf_counter()
    corpus = load_corpus(cfg)
    t, v = corpus.train, corpus.val
    log(f"data: {corpus.source}: {t.documents} training documents ({t.bytes / 1e6:.1f} MB"
        f"{f', subset {cfg.subset:g}' if cfg.subset < 1 else ''}), {v.documents} validation "
        f"documents ({v.bytes / 1e6:.1f} MB), read in {time.perf_counter() - start:.1f}s")
    tokenizer, tokenizer_identity = load_tokenizer(cfg, t, log)
    sha = tokenizer_identity["sha256"]
    train = token_stream(t, tokenizer, sha, cfg.cache_dir, "train", log)
    val = token_stream(v, tokenizer, sha, cfg.cache_dir, "val", log)
    log(f"data: ready in {time.perf_counter() - start:.1f}s: {len(train):,} training and "
        f"{len(val):,} validation tokens, vocab {len(tokenizer)}")
    return PreparedData(train, val, tokenizer, corpus.identity(), tokenizer_identity)

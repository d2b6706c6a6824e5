"""The tokenizer: a byte-level BPE trained on the training split and cached, or a pretrained one.

Either way the result is a ``transformers`` fast tokenizer with ``<|endoftext|>`` as its EOS, so
the final model can be saved and reloaded with ``save_pretrained`` / ``AutoTokenizer``.

A newly trained BPE is cached only when the caller says so (``load_tokenizer`` returns the
write as a function): the data's checks, which need the tokenizer, come first.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from trainer.errors import DataError
from trainer.data.sources import Split, brief, hub_offline, hub_reachable, sha256_hex

EOS = "<|endoftext|>"
MAX_VOCAB = 65535   # token ids are stored as uint16
# Part of the cache key: change FORMAT_VERSION or a setting and every cached BPE is retrained.
FORMAT_VERSION = 1
BPE_SETTINGS = {"model": "bpe", "pre_tokenizer": "byte_level", "add_prefix_space": False,
                "decoder": "byte_level", "special_tokens": [EOS], "min_frequency": 0}

Log = Callable[[str], None]


def load_tokenizer(cfg, train: Split, log: Log = print
                   ) -> tuple[PreTrainedTokenizerFast, dict[str, Any], Callable[[], None]]:
    """The tokenizer --tokenizer names, its identity (kind, name, vocab_size, sha256), and the
    function that caches it (nothing to do for a cached or pretrained one); writes nothing."""
    save: Callable[[], None] = _nothing
    if cfg.tokenizer == "bpe":
        (tok, save), kind = bpe_candidate(train, cfg.vocab_size, Path(cfg.cache_dir), log), "bpe"
    else:
        tok, kind = pretrained_tokenizer(cfg.tokenizer, log), "pretrained"
    if len(tok) > MAX_VOCAB:
        raise DataError(f"--tokenizer {cfg.tokenizer}: its {len(tok)} tokens do not fit the uint16 "
                        f"token cache (at most {MAX_VOCAB}): pass a smaller tokenizer or --tokenizer bpe")
    identity = {"kind": kind, "name": cfg.tokenizer, "vocab_size": len(tok), "sha256": tokenizer_sha256(tok)}
    return tok, identity, save


def _nothing() -> None:
    """Nothing to cache."""


def tokenizer_sha256(tok: PreTrainedTokenizerFast) -> str:
    """sha256 of the tokenizer.json that ``save_pretrained`` writes (the same pretty JSON)."""
    return hashlib.sha256(tok.backend_tokenizer.to_str(pretty=True).encode("utf-8")).hexdigest()


# -- byte-level BPE ----------------------------------------------------------------------
def bpe_cache_path(train: Split, vocab_size: int, cache_dir: Path) -> Path:
    settings = json.dumps(BPE_SETTINGS, sort_keys=True)
    key = sha256_hex(train.key, str(vocab_size), settings, str(FORMAT_VERSION))[:16]
    return cache_dir / "tokenizers" / f"bpe-{vocab_size}-{key}"


def bpe_tokenizer(train: Split, vocab_size: int, cache_dir: Path,
                  log: Log = print) -> PreTrainedTokenizerFast:
    """Load the BPE trained on exactly this split, or train it and cache it."""
    tok, save = bpe_candidate(train, vocab_size, cache_dir, log)
    save()
    return tok


def bpe_candidate(train: Split, vocab_size: int, cache_dir: Path,
                  log: Log = print) -> tuple[PreTrainedTokenizerFast, Callable[[], None]]:
    """The BPE trained on exactly this split, from the cache or trained now, and the function
    that caches a new one (nothing is written until it is called)."""
    path = bpe_cache_path(train, vocab_size, cache_dir)
    start = time.perf_counter()
    if path.is_dir():
        try:
            tok = PreTrainedTokenizerFast.from_pretrained(path)
            log(f"tokenizer: loaded byte-level BPE (vocab {len(tok)}) from {path} "
                f"in {time.perf_counter() - start:.2f}s")
            return tok, _nothing
        except (OSError, ValueError) as exc:   # damaged by hand: a cache can always be rebuilt
            log(f"tokenizer: cached {path} is unreadable ({brief(exc)}); training again")
    damaged = path.is_dir()
    trained = train_bpe(train.texts, vocab_size)
    # Reload what is saved, so a first run and a cached run hand out the very same tokenizer.
    with tempfile.TemporaryDirectory(prefix="smallgpt-bpe-") as scratch:
        trained.save_pretrained(scratch)
        tok = PreTrainedTokenizerFast.from_pretrained(scratch)
    seconds = time.perf_counter() - start

    def save() -> None:
        if damaged:
            shutil.rmtree(path, ignore_errors=True)
        publish_dir(path, trained.save_pretrained)
        log(f"tokenizer: trained byte-level BPE (vocab {vocab_size}) on {train.documents} training "
            f"documents ({train.bytes / 1e6:.1f} MB) in {seconds:.1f}s -> {path}")
    return tok, save


def train_bpe(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=BPE_SETTINGS["min_frequency"], special_tokens=[EOS],
        # All 256 bytes from the start: any text can be encoded, with no unknown token ever used.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer, length=len(texts))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS)


def publish_dir(path: Path, write: Callable[[str], Any]) -> None:
    """Have ``write`` fill a temporary directory, then rename it to ``path`` in one step,
    so a reader sees either no cache or a complete one, even if this process dies midway."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        write(tmp)
        for name in os.listdir(tmp):
            with open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
        try:
            os.replace(tmp, path)
        except OSError:
            if not path.is_dir():
                raise
            # Another process published the same key first; its copy is just as good.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- pretrained ---------------------------------------------------------------------------
def pretrained_tokenizer(name: str, log: Log = print) -> PreTrainedTokenizerFast:
    """A local tokenizer directory, or a hub name (from the local cache when the hub is out of reach)."""
    start = time.perf_counter()
    if Path(name).expanduser().is_dir():
        tok = _from_pretrained(name, "the directory holds no readable tokenizer")
    elif name.startswith((".", "/", "~")):
        raise DataError(f"--tokenizer {name}: no such directory: pass a directory written by "
                        "save_pretrained, a hub name such as gpt2, or --tokenizer bpe")
    elif hub_offline():
        tok = _from_pretrained(name, "offline mode is set (HF_HUB_OFFLINE) and no cached copy was found")
    elif not hub_reachable():
        tok = _from_pretrained(name, "the Hugging Face hub could not be reached and no cached copy was found")
    else:
        tok = _from_pretrained(name, "no such tokenizer on the Hugging Face hub", local_only=False)
    if not isinstance(tok, PreTrainedTokenizerFast):
        raise DataError(f"--tokenizer {name}: {type(tok).__name__} is not a fast (tokenizers-backed) "
                        "tokenizer: pass one with a tokenizer.json, or --tokenizer bpe")
    if tok.eos_token is None:
        # Reuses <|endoftext|> when the vocabulary has it, else adds it as one new token.
        tok.add_special_tokens({"eos_token": EOS})
        log(f"tokenizer: {name} has no EOS token; using {EOS} (id {tok.eos_token_id})")
    log(f"tokenizer: loaded pretrained {name} (vocab {len(tok)}) in {time.perf_counter() - start:.2f}s")
    return tok


def _from_pretrained(name: str, failure: str, local_only: bool = True) -> PreTrainedTokenizerFast:
    """AutoTokenizer, local files only unless asked: an online miss retries for most of a minute."""
    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=local_only)
    except (OSError, ValueError) as exc:
        raise DataError(f"--tokenizer {name}: {failure} ({brief(exc)}): pass --tokenizer bpe to train one on "
                        "the corpus, or a local directory written by save_pretrained") from exc

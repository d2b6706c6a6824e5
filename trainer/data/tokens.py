"""Token streams: each split is tokenized once into a flat uint16 file under the cache, and
memory-mapped read-only from then on (no tokenizing, no copy into memory).

The stream is every document's tokens followed by EOS, in the split's order. The file is keyed
by the split (its texts and document boundaries) and the tokenizer (the sha256 of its
tokenizer.json), so a change to either makes a new file rather than reusing a stale one.

``find_stream`` writes nothing: a stream not cached yet is tokenized in memory, so that its
length can be checked (enough for a training step, a validation block) before it is saved.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from trainer.data.sources import Split, sha256_hex

FORMAT_VERSION = 1
DTYPE = np.uint16
CHUNK_CHARS = 4 << 20   # text per encode_batch call: bounds the memory held by Encoding objects

Log = Callable[[str], None]


def token_stream(split: Split, tokenizer, tokenizer_sha: str, cache_dir: str | Path,
                 name: str, log: Log = print) -> np.memmap:
    """The split's token stream, from the cache or tokenized now and cached."""
    return find_stream(split, tokenizer, tokenizer_sha, cache_dir, name).save(log)


@dataclass
class FoundStream:
    """A split's tokens: the cached stream (a read-only memmap), or tokenized in memory and not
    written yet. ``save`` writes the latter to the cache (the former needs nothing) and logs."""

    name: str
    split: Split
    bin_path: Path
    tokens: np.ndarray
    cached: bool
    tokenizer_sha: str
    eos_id: int
    seconds: float

    def __len__(self) -> int:
        return len(self.tokens)

    def save(self, log: Log = print) -> np.memmap:
        bin_path, meta_path = self.bin_path, self.bin_path.with_suffix(".json")
        if self.cached:
            log(f"tokens: loaded {self.name} stream, {len(self):,} tokens ({bin_path.stat().st_size / 1e6:.1f} "
                f"MB), from {bin_path} in {self.seconds:.2f}s")
            return self.tokens
        start = time.perf_counter()
        bin_path.parent.mkdir(parents=True, exist_ok=True)
        with _atomic_file(bin_path) as f:
            f.write(self.tokens.tobytes())
        # The JSON is written last: its presence, with a matching file size, marks a complete stream.
        split = self.split
        write_json(meta_path, {"format": FORMAT_VERSION, "tokens": len(self), "dtype": np.dtype(DTYPE).name,
                               "documents": split.documents, "bytes": split.bytes, "split_sha256": split.sha256,
                               "tokenizer_sha256": self.tokenizer_sha, "eos_id": self.eos_id})
        log(f"tokens: built {self.name} stream, {len(self):,} tokens from {split.documents} documents "
            f"({split.bytes / 1e6:.1f} MB of text) in {self.seconds + time.perf_counter() - start:.1f}s "
            f"-> {bin_path}")
        return open_stream(bin_path, meta_path)


def find_stream(split: Split, tokenizer, tokenizer_sha: str, cache_dir: str | Path, name: str) -> FoundStream:
    """The split's tokens from the cache, or tokenized now in memory; writes nothing."""
    key = sha256_hex(str(FORMAT_VERSION), split.key, tokenizer_sha)[:20]
    bin_path = Path(cache_dir) / "tokens" / f"{name}-{key}.bin"
    start = time.perf_counter()
    tokens = open_stream(bin_path, bin_path.with_suffix(".json"))
    cached = tokens is not None
    if not cached:
        tokens = tokenize(split.texts, tokenizer)
    return FoundStream(name, split, bin_path, tokens, cached, tokenizer_sha, tokenizer.eos_token_id,
                       time.perf_counter() - start)


def open_stream(bin_path: Path, meta_path: Path) -> np.memmap | None:
    """The cached stream, or None when it is missing or incomplete."""
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        complete = bin_path.stat().st_size == meta["tokens"] * np.dtype(DTYPE).itemsize
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not complete or meta.get("format") != FORMAT_VERSION or meta["tokens"] == 0:
        return None
    return np.memmap(bin_path, dtype=DTYPE, mode="r")


def tokenize(texts: list[str], tokenizer) -> np.ndarray:
    """``texts`` as one uint16 token stream in memory, EOS after each document."""
    backend = tokenizer.backend_tokenizer
    eos = np.asarray([tokenizer.eos_token_id], dtype=DTYPE)
    chunks = [np.zeros(0, dtype=DTYPE)]
    with _specials_as_text(backend):
        for chunk in _chunks(texts, CHUNK_CHARS):
            parts = []
            for enc in backend.encode_batch_fast(chunk, add_special_tokens=False):   # parallel, in Rust
                parts += [np.asarray(enc.ids, dtype=DTYPE), eos]   # numpy refuses ids that do not fit
            chunks.append(np.concatenate(parts))
    return np.concatenate(chunks)


def write_json(path: Path, data: dict[str, Any]) -> None:
    with _atomic_file(path) as f:
        f.write(json.dumps(data, indent=1).encode("utf-8"))


@contextlib.contextmanager
def _atomic_file(path: Path) -> Iterator[Any]:
    """A binary file that appears at ``path`` complete (written, fsynced, renamed) or not at all."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def _specials_as_text(backend) -> Iterator[None]:
    """Encode a literal "<|endoftext|>" inside a document as text, so EOS ids mark only the
    document boundaries we add (as tiktoken's encode_ordinary does)."""
    before = backend.encode_special_tokens
    backend.encode_special_tokens = True
    try:
        yield
    finally:
        backend.encode_special_tokens = before


def _chunks(texts: list[str], max_chars: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    size = 0
    for text in texts:
        chunk.append(text)
        size += len(text)
        if size >= max_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk

"""Token streams: each split is tokenized once into a flat uint16 file under the cache, and
memory-mapped read-only from then on (no tokenizing, no copy into memory).

The stream is every document's tokens followed by EOS, in the split's order. The file is keyed
by the split (its texts and document boundaries) and the tokenizer (the sha256 of its
tokenizer.json), so a change to either makes a new file rather than reusing a stale one.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from trainer.sources import Split, sha256_hex

FORMAT_VERSION = 1
DTYPE = np.uint16
CHUNK_CHARS = 4 << 20   # text per encode_batch call: bounds the memory held by Encoding objects

Log = Callable[[str], None]


def token_stream(split: Split, tokenizer, tokenizer_sha: str, cache_dir: str | Path,
                 name: str, log: Log = print) -> np.memmap:
    """The split's token stream, from the cache or tokenized now and cached."""
    key = sha256_hex(str(FORMAT_VERSION), split.key, tokenizer_sha)[:20]
    bin_path = Path(cache_dir) / "tokens" / f"{name}-{key}.bin"
    meta_path = bin_path.with_suffix(".json")
    start = time.perf_counter()
    tokens = open_stream(bin_path, meta_path)
    if tokens is not None:
        log(f"tokens: loaded {name} stream, {len(tokens):,} tokens ({bin_path.stat().st_size / 1e6:.1f} MB), "
            f"from {bin_path} in {time.perf_counter() - start:.2f}s")
        return tokens
    bin_path.parent.mkdir(parents=True, exist_ok=True)
    count = write_stream(split.texts, tokenizer, bin_path)
    # The JSON is written last: its presence, with a matching file size, marks a complete stream.
    write_json(meta_path, {"format": FORMAT_VERSION, "tokens": count, "dtype": np.dtype(DTYPE).name,
                           "documents": split.documents, "bytes": split.bytes, "split_sha256": split.sha256,
                           "tokenizer_sha256": tokenizer_sha, "eos_id": tokenizer.eos_token_id})
    log(f"tokens: built {name} stream, {count:,} tokens from {split.documents} documents "
        f"({split.bytes / 1e6:.1f} MB of text) in {time.perf_counter() - start:.1f}s -> {bin_path}")
    return open_stream(bin_path, meta_path)


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


def write_stream(texts: list[str], tokenizer, path: Path) -> int:
    """Tokenize ``texts`` (EOS after each) into ``path`` atomically; return the token count."""
    backend = tokenizer.backend_tokenizer
    eos = np.asarray([tokenizer.eos_token_id], dtype=DTYPE)
    count = 0
    with _atomic_file(path) as f, _specials_as_text(backend):
        for chunk in _chunks(texts, CHUNK_CHARS):
            parts = []
            for enc in backend.encode_batch_fast(chunk, add_special_tokens=False):   # parallel, in Rust
                parts += [np.asarray(enc.ids, dtype=DTYPE), eos]   # numpy refuses ids that do not fit
            arr = np.concatenate(parts)
            f.write(arr.tobytes())
            count += arr.size
    return count


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

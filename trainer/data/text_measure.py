"""Bits per byte and word perplexity: losses that compare runs whose tokenizers differ.

A loss in nats per token depends on how much text a token holds, so two runs with different
vocabularies cannot be compared by it. Dividing the summed loss by the evaluated text's UTF-8
bytes (and by ln 2) gives bits per byte, the measure Karpathy's autoresearch and nanochat
score by; dividing it by the text's words gives the word-level perplexity WikiText papers
quote. Both are counted exactly from the evaluated tokens: each token id stands for a fixed
byte string (``TokenText``), so the bytes of a batch are a table lookup and its words the
whitespace-to-text transitions, the context token telling whether the first target opens a
word. Special tokens (``<|endoftext|>``) stand for no text: no bytes, a word boundary.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from trainer.metrics import perplexity

WHITESPACE = frozenset(b" \t\n\r\x0b\x0c")


@dataclass(frozen=True)
class TokenText:
    """What each token id stands for in the text, as tables indexed by id (ids past the
    tokenizer, a padded vocabulary's, stand for nothing)."""

    n_bytes: torch.Tensor        # int64: UTF-8 bytes of the token
    inner_words: torch.Tensor    # int64: words that start inside the token, after its first byte
    opens_word: torch.Tensor     # bool: the first byte is text, not whitespace
    ends_space: torch.Tensor     # bool: the last byte is whitespace, or the token has no bytes

    def to(self, device: torch.device) -> TokenText:
        return TokenText(*(t.to(device) for t in (self.n_bytes, self.inner_words, self.opens_word, self.ends_space)))


def token_bytes(tokenizer: PreTrainedTokenizerFast) -> list[bytes]:
    """The bytes each id of ``tokenizer`` stands for; b"" for its special tokens."""
    special = set(tokenizer.all_special_ids)
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    if _byte_level(tokenizer):      # GPT-2's byte-to-character map, undone
        to_byte = {c: b for b, c in bytes_to_unicode().items()}
        as_bytes = [bytes(to_byte[c] for c in piece) for piece in pieces]
    else:                           # other decoders: each id decoded alone
        as_bytes = [tokenizer.decode([i]).encode("utf-8") for i in range(len(tokenizer))]
    return [b"" if i in special else b for i, b in enumerate(as_bytes)]


def _byte_level(tokenizer: PreTrainedTokenizerFast) -> bool:
    decoder = tokenizer.backend_tokenizer.decoder
    return decoder is not None and type(decoder).__name__ == "ByteLevel"


def token_text(tokenizer: PreTrainedTokenizerFast, vocab_size: int | None = None) -> TokenText:
    """The tables of ``tokenizer``, sized to ``vocab_size`` (the model's, at least the tokenizer's)."""
    pieces = token_bytes(tokenizer)
    size = max(vocab_size or 0, len(pieces))
    n_bytes, inner, opens, ends = ([0] * size, [0] * size, [False] * size, [True] * size)
    for i, piece in enumerate(pieces):
        if not piece:
            continue
        n_bytes[i] = len(piece)
        inner[i] = sum(piece[k] not in WHITESPACE and piece[k - 1] in WHITESPACE for k in range(1, len(piece)))
        opens[i], ends[i] = piece[0] not in WHITESPACE, piece[-1] in WHITESPACE
    return TokenText(torch.tensor(n_bytes), torch.tensor(inner), torch.tensor(opens), torch.tensor(ends))


def text_counts(table: TokenText, batch: torch.Tensor) -> torch.Tensor:
    """(bytes, words) of the text a batch's targets (``batch[:, 1:]``) stand for, float64 on the
    batch's device; ``batch[:, 0]`` is context only. No host sync."""
    targets, before = batch[:, 1:], batch[:, :-1]
    n_bytes = table.n_bytes[targets].sum()
    words = table.inner_words[targets].sum() + (table.opens_word[targets] & table.ends_space[before]).sum()
    return torch.stack([n_bytes, words]).to(torch.float64)


def bits_per_byte(nats: float, n_bytes: float) -> float:
    """Summed loss in nats over the bytes of the text it was measured on, in bits; NaN without bytes."""
    return nats / (math.log(2) * n_bytes) if n_bytes > 0 else math.nan


def word_perplexity(nats: float, words: float) -> float:
    """exp(nats per word); NaN for a text without words, inf where exp overflows."""
    return perplexity(nats / words) if words > 0 else math.nan

"""Bits per byte and word perplexity are counted exactly from the evaluated tokens (trainer.data.text_measure)."""
import math
from pathlib import Path

import pytest
import torch

from trainer.data.text_measure import bits_per_byte, text_counts, token_bytes, token_text, word_perplexity
from trainer.data.tokenizer import train_bpe

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"
TEXTS = ["  Hello,  wörld! naïve\n\nFirst Citizen:\nBefore we proceed  ", "x", "\n\n\n", "日本語 テキスト ok",
         "a\tb\rc\x0bd\x0ce"]


@pytest.fixture(scope="module")
def tok():
    # A small corpus of its own, with multi-byte characters, so the test needs no shared data.
    corpus = ("The quick brown fox jumps over the lazy dog. Ünïcödé façade, naïve café; 日本語のテキスト。\n" * 50
              + "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 50)
    return train_bpe([corpus], 300)


@pytest.mark.parametrize("text", TEXTS)
def test_bytes_and_words_of_a_text_are_exact(tok, text):
    table = token_text(tok)
    batch = torch.tensor([[tok.eos_token_id] + tok(text)["input_ids"]])
    n_bytes, words = text_counts(table, batch).tolist()
    assert n_bytes == len(text.encode("utf-8"))
    assert words == len(text.split())


def test_a_word_cut_by_a_row_boundary_counts_once(tok):
    table = token_text(tok)
    ids = tok("hear me speak further")["input_ids"]
    whole = text_counts(table, torch.tensor([[tok.eos_token_id] + ids]))
    # The same stream cut in two rows that overlap by one (the context) token, as packed blocks are.
    cut = len(ids) // 2
    rows = [[tok.eos_token_id] + ids[:cut], ids[cut - 1:]]
    parts = sum(text_counts(table, torch.tensor([r])) for r in rows)
    assert parts.tolist() == whole.tolist()


def test_special_tokens_and_padded_ids_stand_for_no_text(tok):
    table = token_text(tok, vocab_size=len(tok) + 20)
    assert table.n_bytes.shape[0] == len(tok) + 20
    assert table.n_bytes[tok.eos_token_id] == 0 and table.n_bytes[len(tok):].sum() == 0
    assert token_bytes(tok)[tok.eos_token_id] == b""
    # An EOS between two words separates them: two words, the bytes of both.
    ids = tok("speak")["input_ids"]
    batch = torch.tensor([[tok.eos_token_id] + ids + [tok.eos_token_id] + ids])
    assert text_counts(table, batch).tolist() == [10.0, 2.0]


def test_tokenizers_of_different_sizes_count_the_same_text_alike():
    text = SHAKESPEARE.read_text()[:20000] if SHAKESPEARE.exists() else "To be, or not to be: that is the question.\n" * 400
    counts = []
    for vocab in (260, 1000):
        tok = train_bpe([text], vocab)
        counts.append(text_counts(token_text(tok), torch.tensor([[tok.eos_token_id] + tok(text)["input_ids"]])).tolist())
    assert counts[0] == counts[1] == [len(text.encode()), len(text.split())]


def test_bits_per_byte_and_word_perplexity_from_summed_nats():
    assert bits_per_byte(100 * math.log(2), 50) == pytest.approx(2.0)
    assert math.isnan(bits_per_byte(1.0, 0))
    assert word_perplexity(30.0, 10) == pytest.approx(math.exp(3.0))
    assert math.isnan(word_perplexity(1.0, 0)) and word_perplexity(1e6, 1) == math.inf

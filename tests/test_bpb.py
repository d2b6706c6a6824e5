"""Bits per byte and word perplexity of every evaluation (issue 29): in the trainer's metrics,
its state and result, and the experiment database.

The expected values are counted here apart from trainer.data.text_measure: the evaluated targets are
decoded by the tokenizer itself, cut at <|endoftext|>, and their UTF-8 bytes and words counted.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

import expdb
from trainer.loop import Evaluation
from trainer.run import train
from trainer.state import TrainState
from trainer.data.text_measure import text_counts, token_text
from trainer_fixtures import STEPS_PER_EPOCH, ListRecorder


class TextRecorder(ListRecorder):
    """Keeps every evaluation's whole metrics."""

    def __init__(self):
        super().__init__()
        self.eval_metrics: list[tuple[int, dict]] = []

    def log_eval(self, step, epoch, metrics):
        self.eval_metrics.append((step, dict(metrics)))
        super().log_eval(step, epoch, metrics)


@pytest.fixture(scope="module")
def wide_data(tiny_base_cfg):
    """The same corpus under a tokenizer of twice the vocabulary, cut like tiny_data."""
    from trainer.data import prepare_data

    cfg = tiny_base_cfg.replace(vocab_size=1024)
    full = prepare_data(cfg, log=lambda *_: None)
    keep = STEPS_PER_EPOCH * cfg.effective_batch * cfg.block_size + 1
    return cfg, dataclasses.replace(full, train=full.train[:keep])


def evaluated_text(data, cfg) -> tuple[int, int, int]:
    """(tokens, bytes, words) of the targets of the validation batches an evaluation reads: blocks
    0..n-1 of block_size + 1 tokens, block_size apart (a block's last token is the next one's first),
    so the targets are val[1 : n * block_size + 1] and val[0] their context."""
    n_blocks = min(cfg.eval_batches * cfg.micro_batch, (len(data.val) - 1) // cfg.block_size)
    ids = [int(i) for i in data.val[:n_blocks * cfg.block_size + 1]]
    eos = data.tokenizer.eos_token_id

    def decode(part: list[int]) -> bytes:
        return data.tokenizer.decode(part, clean_up_tokenization_spaces=False).encode("utf-8")

    context = decode(ids[:1]) if ids[0] != eos else b""
    segments, current = [], ([] if ids[0] == eos else ids[:1])
    for token in ids[1:]:
        if token == eos:        # stands for no text, and ends a word
            segments.append(current)
            current = []
        else:
            current.append(token)
    segments.append(current)
    texts = [decode(s) for s in segments]
    assert not any("\ufffd".encode() in t for t in texts), "a character cut by the block edges"
    n_bytes = sum(map(len, texts)) - len(context)
    # Words that start in the targets: the first segment's, less the context token's own.
    words = sum(len(t.split()) for t in texts) - len(context.split())
    return n_blocks * cfg.block_size, n_bytes, words


def assert_measures(metrics: dict, counted: tuple[int, int, int]) -> None:
    tokens, n_bytes, words = counted
    nats = metrics["val_loss"] * tokens
    assert metrics["val_bpb"] == pytest.approx(nats / n_bytes / math.log(2), rel=1e-9)
    assert metrics["val_word_ppl"] == pytest.approx(math.exp(nats / words), rel=1e-9)


@pytest.mark.parametrize("vocabulary", ["512", "1024"])
def test_each_evaluation_records_the_bits_per_byte_of_its_text(vocabulary, tiny_cfg, tiny_data, wide_data):
    cfg, data = (tiny_cfg, tiny_data) if vocabulary == "512" else (wide_data[0].replace(
        out_dir=tiny_cfg.out_dir), wide_data[1])
    rec = TextRecorder()
    result = train(cfg.replace(epochs=1), rec, data=data, log=lambda *_: None)
    counted = evaluated_text(data, cfg)
    assert [step for step, _ in rec.eval_metrics] == [20, 30]
    for _, metrics in rec.eval_metrics:
        assert_measures(metrics, counted)
    ((_, epoch),) = rec.epochs
    assert {k: epoch[k] for k in ("val_loss", "val_bpb", "val_word_ppl")} == \
        {k: rec.eval_metrics[-1][1][k] for k in ("val_loss", "val_bpb", "val_word_ppl")}
    assert "mfu" in epoch
    best = min((m for _, m in rec.eval_metrics), key=lambda m: m["val_loss"])
    assert (result.best_val_loss, result.best_val_bpb) == (best["val_loss"], best["val_bpb"])


def test_every_vocabulary_counts_the_same_bytes_and_words(tiny_data, wide_data):
    """What makes bits per byte comparable between tokenizers: the whole validation text, under
    either vocabulary, counts the UTF-8 bytes of its documents and the same words."""
    _, wide = wide_data
    assert (len(tiny_data.tokenizer), len(wide.tokenizer)) == (512, 1024)
    counts = []
    for data in (tiny_data, wide):
        stream = torch.from_numpy(np.concatenate([[data.tokenizer.eos_token_id], data.val]).astype(np.int64))
        counts.append(text_counts(token_text(data.tokenizer), stream[None]).tolist())
    assert len(tiny_data.val) != len(wide.val)                      # different tokens ...
    assert counts[0] == counts[1]                                   # ... the same text
    assert counts[0][0] == tiny_data.dataset_identity["val"]["bytes"] == wide.dataset_identity["val"]["bytes"]


def test_a_padded_vocabulary_counts_its_padding_as_no_text(tiny_data):
    table = token_text(tiny_data.tokenizer, 576)        # a model's vocabulary padded to a multiple of 64
    assert len(table.n_bytes) == 576 and int(table.n_bytes[len(tiny_data.tokenizer):].sum()) == 0


class EpochsKept:
    """The database's recorder, keeping the epoch metrics the trainer gave it."""

    def __init__(self, recorder):
        self.recorder, self.epochs = recorder, []

    def __getattr__(self, name):
        return getattr(self.recorder, name)

    def log_epoch(self, epoch, metrics):
        self.epochs.append(dict(metrics))
        self.recorder.log_epoch(epoch, metrics)


def test_a_run_in_the_database_keeps_bpb_in_its_evals_epochs_and_run(tiny_cfg, tiny_data, tmp_path):
    with expdb.open(tmp_path / "bpb.db") as db:
        rec = EpochsKept(db.recorder())
        result = train(tiny_cfg, rec, data=tiny_data, log=lambda *_: None)
        run, evals, epochs = db.run(result.run_id), db.evals(result.run_id), db.epochs(result.run_id)
        runs, study = db.runs(), db.compare([result.run_id])
    counted = evaluated_text(tiny_data, tiny_cfg)
    assert evals["step"].tolist() == [20, 30, 40, 60]
    for metrics in evals.to_dict("records"):
        assert_measures(metrics, counted)
    assert epochs[["val_bpb", "val_word_ppl"]].values.tolist() == \
        evals.set_index("step").loc[[30, 60], ["val_bpb", "val_word_ppl"]].values.tolist()
    # Stored as reported (NaN for None: no peak measured), not dropped as an unknown key.
    assert epochs["mfu"].tolist() == pytest.approx([math.nan if m["mfu"] is None else m["mfu"] for m in rec.epochs],
                                                   nan_ok=True)
    best = evals.loc[evals["val_loss"].idxmin()]
    assert (run.best_step, run.best_val_loss, run.best_val_bpb) == (best["step"], best["val_loss"], best["val_bpb"])
    assert result.best_val_bpb == run.best_val_bpb == runs["best_val_bpb"].iloc[0] == study["best_val_bpb"].iloc[0]


def test_resume_restores_the_best_bits_per_byte(tiny_cfg, tiny_data, tmp_path):
    first = train(tiny_cfg.replace(epochs=1), data=tiny_data, log=lambda *_: None)
    assert math.isfinite(first.best_val_bpb)
    # The same run again from its final checkpoint: no step is left and nothing is evaluated, so
    # the bpb it ends with can only be the one its checkpoint saved.
    rec = ListRecorder()
    again = train(tiny_cfg.replace(epochs=1, out_dir=str(tmp_path / "again")), rec, data=tiny_data,
                  resume=first.final_checkpoint, log=lambda *_: None)
    assert again.steps == first.steps and rec.evals == []
    assert (again.best_val_loss, again.best_val_bpb) == (first.best_val_loss, first.best_val_bpb)


def test_an_older_checkpoint_state_resumes_with_nan_bpb():
    state = TrainState(step=5, best_val_loss=2.0, best_val_bpb=0.9, last_val_loss=2.5, last_val_bpb=1.0,
                       last_val_word_ppl=math.inf)
    assert TrainState.from_json(state.to_json()) == state
    old = {k: v for k, v in state.to_json().items() if "bpb" not in k and "word" not in k}
    restored = TrainState.from_json(old)
    assert restored.best_val_loss == 2.0
    assert all(math.isnan(x) for x in (restored.best_val_bpb, restored.last_val_bpb, restored.last_val_word_ppl))


def test_a_text_without_words_has_nan_word_perplexity():
    evaluation = Evaluation.from_sums(nats=20.0, tokens=10, n_bytes=10, words=0)
    assert evaluation.loss == 2.0 and evaluation.bpb == pytest.approx(2.0 / math.log(2))
    assert math.isnan(evaluation.word_ppl) and math.isnan(evaluation.metrics()["val_word_ppl"])

"""The data pipeline: sources and their splits, the tokenizer and its cache, the token streams.

Corpora are generated here (a few KB), so the tests need no download and no ../shared.
"""
from __future__ import annotations

import json
import os
import random
import sysconfig
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from trainer.config import TrainConfig
from trainer.data import PreparedData, prepare_data
from trainer.errors import DataError
from trainer.data.sources import Split, assign, hub_reachable, load_corpus, load_stdlib, stdlib_files
from trainer.data.tokenizer import EOS, bpe_tokenizer

WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at "
         "which but have an they you were her she def return class import self None True naïve "
         "café 日本語 🙂").split()


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        lines = [" ".join(rng.choices(WORDS, k=rng.randint(3, 12))) for _ in range(rng.randint(2, 6))]
        docs.append("\n".join(("    " if rng.random() < 0.3 else "") + line for line in lines) + "\n")
    return docs


def config(tmp_path: Path, **kw) -> TrainConfig:
    # Blocks small enough that the corpora here fill a training step and a validation block.
    base = {"cache_dir": str(tmp_path / "cache"), "vocab_size": 300, "val_fraction": 0.2, "block_size": 16,
            "micro_batch": 2}
    return TrainConfig(**{**base, **kw})


def logs() -> list[str]:
    return []


def split_docs(stream: np.ndarray, eos: int) -> list[list[int]]:
    ends = np.flatnonzero(np.asarray(stream) == eos)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [stream[s:e].tolist() for s, e in zip(starts, ends)]


def write_jsonl(path: Path, docs: list[str], column: str = "text") -> Path:
    rows = (json.dumps({column: d, "id": i}) + "\n" for i, d in enumerate(docs))
    path.write_text("".join(rows), encoding="utf-8")
    return path


# -- splitting ------------------------------------------------------------------------------
def test_assign_is_disjoint_stable_and_subsets_only_training(tmp_path):
    cfg = config(tmp_path, val_fraction=0.1)
    keyed = [(f"doc/{i}.py", f"text {i}") for i in range(2000)]
    train, val = assign(keyed, cfg)
    assert not set(train) & set(val) and len(train) + len(val) == 2000
    assert 0.07 < len(val) / 2000 < 0.13
    assert assign(keyed, cfg) == (train, val)
    # Adding documents never moves the old ones.
    _, val_fewer = assign(keyed[:500], cfg)
    assert set(val_fewer) == set(val) & {t for _, t in keyed[:500]}

    sub_train, sub_val = assign(keyed, cfg.replace(subset=0.25))
    smaller_train, _ = assign(keyed, cfg.replace(subset=0.1))
    assert sub_val == val                                   # validation stays whole
    assert set(sub_train) <= set(train) and 0.2 < len(sub_train) / len(train) < 0.3
    assert set(smaller_train) <= set(sub_train)             # one hash: smaller subsets nest
    assert assign(keyed, cfg.replace(subset=0.25))[0] == sub_train


def test_stdlib_source_skips_tests_and_site_packages_and_is_deterministic(tmp_path):
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files(root)
    assert files == sorted(files) and "os.py" in files
    skipped = {"site-packages", "test", "tests", "idle_test"}
    assert not any(skipped & set(Path(f).parts[:-1]) for f in files)

    cfg = config(tmp_path, val_fraction=0.05)
    source, train, val = load_stdlib(cfg)
    assert source == f"stdlib:{root}"
    assert (source, train, val) == load_stdlib(cfg)
    assert 0 < len(val) < 0.15 * len(train)
    assert len(train) + len(val) <= len(files)


def test_split_identity_hashes_the_texts_in_order():
    split = Split.of(["ab", "c"])
    assert split.identity()["documents"] == 2 and split.identity()["bytes"] == 3
    assert split.sha256 == Split.of(["a", "bc"]).sha256    # the recorded identity: the concatenation
    assert split.key != Split.of(["a", "bc"]).key          # the cache key: boundaries count too


def test_stdlib_subset_prepares_with_identity(tmp_path):
    log = logs()
    data = prepare_data(config(tmp_path, subset=0.02, val_fraction=0.05), log=log.append)
    ident = data.dataset_identity
    assert ident["source"].startswith("stdlib:") and ident["subset"] == 0.02
    assert ident["train"]["documents"] > 0 and ident["val"]["documents"] > 0
    assert data.tokenizer_identity["kind"] == "bpe" and data.vocab_size == 300
    full = load_corpus(config(tmp_path, val_fraction=0.05))
    assert ident["val"] == full.val.identity()              # validation unchanged by --subset
    assert ident["train"]["documents"] < 0.1 * full.train.documents


# -- local files and dataset directories ----------------------------------------------------
@pytest.mark.parametrize("kind", ["txt", "jsonl", "json", "parquet"])
def test_data_files_of_each_kind(tmp_path, kind):
    docs = make_docs(40)
    if kind == "txt":       # several .txt files: one document each
        files = []
        for i, d in enumerate(docs):
            files.append(tmp_path / f"doc{i:02d}.txt")
            files[-1].write_text(d, encoding="utf-8")
    elif kind == "parquet":
        files = [tmp_path / "docs.parquet"]
        pq.write_table(pa.table({"body": docs}), files[0])
    else:
        files = [write_jsonl(tmp_path / f"docs.{kind}", docs, column="body")]
    column = "text" if kind == "txt" else "body"
    cfg = config(tmp_path, data_files=[str(f) for f in files], text_column=column)
    data = prepare_data(cfg, log=logs().append)
    ident = data.dataset_identity
    assert ident["source"] == "files"
    assert ident["train"]["documents"] + ident["val"]["documents"] == 40
    assert ident["train"]["bytes"] + ident["val"]["bytes"] == sum(len(d.encode()) for d in docs)
    decoded = [data.tokenizer.decode(d) for d in split_docs(data.train, data.tokenizer.eos_token_id)]
    assert set(decoded) <= set(docs) and len(decoded) == ident["train"]["documents"]


def test_single_txt_file_is_split_into_paragraphs(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("\n\n".join(d.strip() for d in make_docs(60)), encoding="utf-8")
    corpus = load_corpus(config(tmp_path, data_files=[str(path)]))
    assert corpus.train.documents + corpus.val.documents == 60


def test_local_dataset_directory(tmp_path):
    folder = tmp_path / "mydata"
    folder.mkdir()
    (folder / "train.txt").write_text("".join(make_docs(30, seed=1)), encoding="utf-8")
    (folder / "validation.txt").write_text("first line\n\nsecond line\n", encoding="utf-8")
    corpus = load_corpus(config(tmp_path, dataset=str(folder)))
    assert corpus.source == f"hf:{folder.resolve()}"
    assert corpus.val.texts == ["first line", "second line"]   # its own validation split, empty rows dropped
    assert corpus.train.documents == sum(len(d.splitlines()) for d in make_docs(30, seed=1))


def test_saved_dataset_directory_without_validation_is_hash_split(tmp_path):
    import datasets
    datasets.Dataset.from_dict({"text": make_docs(50) + [""]}).save_to_disk(str(tmp_path / "saved"))
    corpus = load_corpus(config(tmp_path, dataset=str(tmp_path / "saved")))
    assert corpus.train.documents + corpus.val.documents == 50 and corpus.val.documents > 0


# -- errors ---------------------------------------------------------------------------------
def test_missing_and_unsupported_files_are_named(tmp_path):
    bad = tmp_path / "notes.docx"
    bad.write_text("x")
    with pytest.raises(DataError, match=r"--data-files.*nope\.txt.*no such file.*notes\.docx.*\.jsonl"):
        load_corpus(config(tmp_path, data_files=[str(tmp_path / "nope.txt"), str(bad)]))


def test_empty_corpus_and_empty_split_are_errors(tmp_path):
    empty = write_jsonl(tmp_path / "empty.jsonl", ["", "  ", "\n"])
    with pytest.raises(DataError, match="--data-files .*empty.jsonl': holds no non-empty documents"):
        load_corpus(config(tmp_path, data_files=[str(empty)]))
    one = write_jsonl(tmp_path / "one.jsonl", ["a single document"])
    with pytest.raises(DataError, match="split is empty after splitting 1 documents.*--data-files"):
        load_corpus(config(tmp_path, data_files=[str(one)]))


def test_missing_text_column_lists_the_columns(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", make_docs(5), column="content")
    with pytest.raises(DataError, match="--text-column 'text'.*content"):
        load_corpus(config(tmp_path, data_files=[str(path)]))


def test_unreadable_files_are_named_with_the_fix_and_nothing_is_cached(tmp_path):
    binary = tmp_path / "binary.txt"
    binary.write_bytes(bytes(range(256)) * 4)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": "fine too"}\n{not json\n', encoding="utf-8")
    not_rows = tmp_path / "numbers.jsonl"
    not_rows.write_text('{"text": "fine"}\n[1, 2]\n', encoding="utf-8")
    cases = [([str(binary)], r"binary\.txt': is not UTF-8 text \(byte 0x80 at offset 128"),
             ([str(write_jsonl(tmp_path / "ok.jsonl", make_docs(5))), str(broken)],
              r"broken\.jsonl': line 3 is not valid JSON"),
             ([str(not_rows)], r"numbers\.jsonl': line 2 is not a JSON object")]
    for files, message in cases:
        with pytest.raises(DataError, match="--data-files '.*" + message):
            prepare_data(config(tmp_path, data_files=files), log=logs().append)
    assert not (tmp_path / "cache").exists()          # not even the datasets library's arrow cache


def test_a_corpus_too_small_for_a_step_or_a_validation_block_is_refused_before_any_write(tmp_path):
    # 20 documents "a": exactly 2 tokens each (one byte, then EOS) whatever the BPE learns;
    # --val-fraction 0.2 puts documents 1, 8 and 17 (by their hash) in validation.
    path = write_jsonl(tmp_path / "a.jsonl", ["a"] * 20)
    cfg = config(tmp_path, data_files=[str(path)], block_size=8, micro_batch=1)
    with pytest.raises(DataError, match=r"a\.jsonl': the validation split has 6 tokens, fewer than one block "
                                        r"of --block-size 8 needs \(9\).*--val-fraction"):
        prepare_data(cfg, log=logs().append)
    with pytest.raises(DataError, match=r"the training split has 34 tokens, 2 blocks of --block-size 16, fewer "
                                        r"than one optimizer step needs \(3: --micro-batch 3 x --grad-accum 1\)"):
        prepare_data(cfg.replace(block_size=16, micro_batch=3), log=logs().append)
    assert not (tmp_path / "cache").exists()          # no tokenizer, no token stream, no datasets cache
    data = prepare_data(cfg.replace(block_size=2), log=logs().append)     # 2 validation blocks: enough
    assert (len(data.train), len(data.val)) == (34, 6)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["tokenizers", "tokens"]


@pytest.fixture
def downloads(monkeypatch):
    """Every attempt to reach the hub through the libraries, which retry a dead connection for
    20-50 s: a fast refusal is one that never makes such an attempt (checked by what was
    called, not by a stopwatch). The calls still go through to the real functions."""
    import datasets
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES as _PACKAGED_MODULES

    import trainer.data.tokenizer
    attempts: list[str] = []
    real_load, real_tokenizer = datasets.load_dataset, trainer.data.tokenizer._from_pretrained

    def load_dataset(name, *args, **kwargs):
        if name not in _PACKAGED_MODULES and not os.path.isdir(name):    # local files never reach the hub
            attempts.append(f"datasets.load_dataset({name})")
        return real_load(name, *args, **kwargs)

    def from_pretrained(name, failure, local_only=True):
        if not local_only:
            attempts.append(f"AutoTokenizer.from_pretrained({name}, online)")
        return real_tokenizer(name, failure, local_only)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(trainer.data.tokenizer, "_from_pretrained", from_pretrained)
    return attempts


def test_unreachable_hub_fails_fast_naming_the_flag(tmp_path, downloads):
    if hub_reachable():
        pytest.skip("the Hugging Face hub is reachable here; this test is for machines without it")
    with pytest.raises(DataError, match=r"--dataset wikitext.*could not be reached.*--data-files PATH"):
        load_corpus(config(tmp_path, dataset="wikitext", dataset_config="wikitext-103-raw-v1"))
    assert downloads == []          # refused by the probe, before any download could start retrying


def test_dead_hub_endpoint_fails_fast_for_dataset_and_tokenizer(tmp_path, monkeypatch, downloads):
    # Port 9 on this machine refuses at once: the same path as a hub out of reach, on any machine.
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(DataError, match="--dataset some-org/some-corpus.*could not be reached"):
        load_corpus(config(tmp_path, dataset="some-org/some-corpus"))
    with pytest.raises(DataError, match="--tokenizer smallgpt-lab-test/no-such-tokenizer.*--tokenizer bpe"):
        prepare_data(config(tmp_path, data_files=[str(write_jsonl(tmp_path / "d.jsonl", make_docs(20)))],
                            tokenizer="smallgpt-lab-test/no-such-tokenizer"), log=logs().append)
    assert downloads == []          # the cache was asked, the network never


def test_missing_tokenizer_directory_and_offline_mode(tmp_path, monkeypatch):
    cfg = config(tmp_path, data_files=[str(write_jsonl(tmp_path / "d.jsonl", make_docs(20)))])
    with pytest.raises(DataError, match="--tokenizer ./no-such-dir: no such directory.*--tokenizer bpe"):
        prepare_data(cfg.replace(tokenizer="./no-such-dir"), log=logs().append)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="--tokenizer some-org/tok: offline mode is set.*--tokenizer bpe"):
        prepare_data(cfg.replace(tokenizer="some-org/tok"), log=logs().append)


def test_dataset_directory_without_data_files(tmp_path):
    (tmp_path / "blank").mkdir()
    with pytest.raises(DataError, match="blank: the directory holds no data files.*--data-files"):
        load_corpus(config(tmp_path, dataset=str(tmp_path / "blank")))


# -- tokenizer ------------------------------------------------------------------------------
def test_bpe_cache_hit_returns_the_same_tokenizer_without_training(tmp_path):
    split = Split.of(make_docs(30))
    first_log, second_log = logs(), logs()
    first = bpe_tokenizer(split, 300, tmp_path, first_log.append)
    saved = next((tmp_path / "tokenizers").iterdir()) / "tokenizer.json"
    mtime = saved.stat().st_mtime_ns
    second = bpe_tokenizer(split, 300, tmp_path, second_log.append)
    assert "trained" in first_log[0] and "loaded" in second_log[0]
    assert saved.stat().st_mtime_ns == mtime
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
    assert (first.eos_token, first.bos_token, first.unk_token) == (EOS, EOS, EOS)
    leftovers = [p for p in (tmp_path / "tokenizers").iterdir() if p.name.startswith(".")]
    assert not leftovers   # the temporary directory was renamed, not left behind
    # A different vocabulary size is a different cache entry.
    assert len(bpe_tokenizer(split, 280, tmp_path, logs().append)) == 280


def test_tokenizer_survives_save_pretrained_and_auto_tokenizer(tmp_path):
    data = prepare_data(config(tmp_path, data_files=[str(write_jsonl(tmp_path / "d.jsonl", make_docs(30)))]),
                        log=logs().append)
    data.tokenizer.save_pretrained(tmp_path / "tok")
    again = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert again.eos_token == EOS and len(again) == data.vocab_size
    # ...and a saved directory is a valid --tokenizer.
    cfg = config(tmp_path, data_files=[str(tmp_path / "d.jsonl")], tokenizer=str(tmp_path / "tok"))
    reused = prepare_data(cfg, log=logs().append)
    assert reused.tokenizer_identity["kind"] == "pretrained"
    assert reused.tokenizer_identity["sha256"] == data.tokenizer_identity["sha256"]
    assert np.array_equal(reused.train, data.train)


def _save_word_level(path: Path, vocab: dict[str, int], **special) -> str:
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, **special).save_pretrained(path)
    return str(path)


def test_pretrained_without_eos_gets_endoftext(tmp_path):
    vocab = {"[UNK]": 0, EOS: 1, **{w: i + 2 for i, w in enumerate(dict.fromkeys(WORDS))}}
    name = _save_word_level(tmp_path / "wl", vocab, unk_token="[UNK]")
    data = prepare_data(config(tmp_path, data_files=[str(write_jsonl(tmp_path / "d.jsonl", make_docs(30)))],
                               tokenizer=name), log=logs().append)
    assert data.tokenizer.eos_token == EOS and data.tokenizer.eos_token_id == 1
    assert data.vocab_size == len(vocab) and int(data.train[-1]) == 1


def test_vocabulary_too_large_for_uint16(tmp_path):
    name = _save_word_level(tmp_path / "big", {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(70000)}},
                            unk_token="[UNK]", eos_token="[UNK]")
    with pytest.raises(DataError, match="70001 tokens do not fit the uint16"):
        prepare_data(config(tmp_path, data_files=[str(write_jsonl(tmp_path / "d.jsonl", make_docs(30)))],
                            tokenizer=name), log=logs().append)


# -- token streams --------------------------------------------------------------------------
def test_token_cache_is_uint16_memmap_reused_and_decodes_back(tmp_path):
    docs = make_docs(40) + ["tabs\tand  spaces\r\n", "a literal <|endoftext|> inside"]
    cfg = config(tmp_path, data_files=[str(write_jsonl(tmp_path / "d.jsonl", docs))])
    first_log, second_log = logs(), logs()
    first = prepare_data(cfg, log=first_log.append)
    second = prepare_data(cfg, log=second_log.append)
    assert isinstance(first, PreparedData)
    for stream in (second.train, second.val):
        assert isinstance(stream, np.memmap) and stream.dtype == np.uint16 and stream.ndim == 1
        assert not stream.flags.writeable
    assert any("built train" in m for m in first_log) and any("loaded train" in m for m in second_log)
    assert not any("built" in m or "trained" in m for m in second_log)
    assert np.array_equal(first.train, second.train) and np.array_equal(first.val, second.val)

    eos = second.tokenizer.eos_token_id
    corpus = load_corpus(cfg)
    for stream, split in ((second.train, corpus.train), (second.val, corpus.val)):
        assert int(stream[-1]) == eos
        assert [second.tokenizer.decode(d) for d in split_docs(stream, eos)] == split.texts
    assert (tmp_path / "cache" / "tokens").is_dir()
    assert not [p for p in (tmp_path / "cache" / "tokens").iterdir() if p.name.endswith(".tmp")]


def test_truncated_token_cache_is_rebuilt(tmp_path):
    cfg = config(tmp_path, data_files=[str(write_jsonl(tmp_path / "d.jsonl", make_docs(30)))])
    first = prepare_data(cfg, log=logs().append)
    (bin_path,) = (tmp_path / "cache" / "tokens").glob("train-*.bin")
    expected = np.array(first.train)
    del first
    with open(bin_path, "r+b") as f:
        f.truncate(10)
    log = logs()
    again = prepare_data(cfg, log=log.append)
    assert any("built train" in m for m in log) and np.array_equal(again.train, expected)


# -- the whole default corpus ---------------------------------------------------------------
@pytest.mark.slow
def test_full_stdlib_corpus_first_run_and_cached(tmp_path):
    # How long each takes is the benchmark's business (bench/); here: the second run reuses the first's work.
    cfg = TrainConfig(cache_dir=str(tmp_path / "cache"))   # defaults: stdlib, bpe, vocab 4096
    first_log, second_log = logs(), logs()
    first = prepare_data(cfg, log=first_log.append)
    second = prepare_data(cfg, log=second_log.append)
    assert first.vocab_size == 4096 and len(first.train) > 1_000_000 and len(first.val) > 10_000
    assert np.array_equal(first.train, second.train)
    assert first.tokenizer_identity == second.tokenizer_identity
    assert any("built train" in m for m in first_log) and any("loaded train" in m for m in second_log)
    assert not any("built" in m or "trained" in m for m in second_log)

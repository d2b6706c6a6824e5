"""Where the text comes from: the standard library's own sources (the default, no download),
a ``datasets`` name or local dataset directory, or local files.

Every source ends as a :class:`Corpus` of training and validation documents in a fixed order.
Documents are assigned to a split by a hash of a stable key (a file's relative path, a row's
index), never by position or a random draw, so adding documents never moves the others.

Reading writes nothing under --cache-dir: ``datasets`` converts local files into a scratch
cache in the system's temporary folder, removed once the texts are in memory, so a file that
cannot be read, decoded or split leaves no trace (the rule: nothing is written before every
check has passed).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sysconfig
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from trainer.errors import DataError

# Directory names that hold tests or third-party code rather than the standard library itself.
STDLIB_SKIP = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
# File suffix -> the packaged ``datasets`` builder that reads it.
BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
HUB_PROBE_TIMEOUT_S = 3.0


def sha256_hex(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()


def brief(exc: BaseException, limit: int = 300) -> str:
    """A library's exception message on one line, short enough to sit inside ours."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def hash_fraction(salt: str, key: str) -> float:
    """A uniform number in [0, 1) that depends only on (salt, key)."""
    digest = hashlib.sha256(f"{salt}:{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@dataclass(frozen=True)
class Split:
    texts: list[str]
    sha256: str   # of the texts concatenated in order: the recorded identity
    key: str      # sha256 + every document's length: boundaries change the token stream too
    bytes: int

    @classmethod
    def of(cls, texts: list[str]) -> "Split":
        whole, lengths = hashlib.sha256(), hashlib.sha256()
        size = 0
        for text in texts:
            data = text.encode("utf-8")
            whole.update(data)
            lengths.update(b"%d," % len(data))
            size += len(data)
        sha = whole.hexdigest()
        return cls(texts, sha, sha256_hex(sha, lengths.hexdigest()), size)

    @property
    def documents(self) -> int:
        return len(self.texts)

    def identity(self) -> dict[str, Any]:
        return {"documents": self.documents, "bytes": self.bytes, "sha256": self.sha256}


@dataclass(frozen=True)
class Corpus:
    source: str
    train: Split
    val: Split
    subset: float

    def identity(self) -> dict[str, Any]:
        return {"source": self.source, "train": self.train.identity(),
                "val": self.val.identity(), "subset": self.subset}


def load_corpus(cfg) -> Corpus:
    """The corpus that ``cfg`` names: --data-files, --dataset, or the standard library."""
    if cfg.data_files:
        more = " ..." if len(cfg.data_files) > 1 else ""
        return _finish(*load_files(cfg), cfg, f"--data-files {cfg.data_files[0]!r}{more}",
                       "pass more or larger files with --data-files")
    if cfg.dataset:
        return _finish(*load_dataset_splits(cfg), cfg, f"--dataset {cfg.dataset!r}",
                       "pass a larger dataset, or local files with --data-files")
    return _finish(*load_stdlib(cfg), cfg, "the standard library's sources",
                   "use a Python installation that ships them, or pass --data-files")


def _finish(source: str, train: list[str], val: list[str], cfg, what: str, fix: str) -> Corpus:
    if not train and not val:
        raise DataError(f"{what}: holds no non-empty documents (text column {cfg.text_column!r}): {fix}")
    for name, texts in (("training", train), ("validation", val)):
        if not texts:
            raise DataError(f"{what}: the {name} split is empty after splitting {len(train) + len(val)} "
                            f"documents with --val-fraction {cfg.val_fraction} and --subset {cfg.subset}: "
                            f"{fix}, or raise those fractions")
    return Corpus(source, Split.of(train), Split.of(val), cfg.subset)


def assign(keyed: Iterable[tuple[str, str]], cfg, has_val: bool = False) -> tuple[list[str], list[str]]:
    """Split (key, text) pairs by hash; keep cfg.subset of the training side.

    With ``has_val`` every document is training data (the source has its own validation split).
    Validation is never subsetted, so the validation losses of different subsets compare.
    """
    train, val = [], []
    for key, text in keyed:
        if not has_val and hash_fraction("val", key) < cfg.val_fraction:
            val.append(text)
        elif cfg.subset >= 1 or hash_fraction("subset", key) < cfg.subset:
            train.append(text)
    return train, val


def _indexed(texts: Iterable[str | None]) -> Iterable[tuple[str, str]]:
    """(row index, text) for the non-empty rows; the index is the key, so empty rows keep theirs."""
    return ((str(i), t) for i, t in enumerate(texts) if t and not t.isspace())


# -- the standard library --------------------------------------------------------------
def stdlib_files(root: Path) -> list[str]:
    """Relative paths of the standard library's .py files, sorted, without tests or site-packages."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_SKIP]   # prune: site-packages is huge
        rel = Path(dirpath).relative_to(root)
        found.extend((rel / f).as_posix() for f in filenames if f.endswith(".py"))
    return sorted(found)


def _read_stdlib(root: Path) -> Iterable[tuple[str, str]]:
    for rel in stdlib_files(root):
        try:
            text = (root / rel).read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue   # a few installs ship Latin-1 or unreadable files; they are not worth a failure
        if text.strip():
            yield rel, text


def load_stdlib(cfg) -> tuple[str, list[str], list[str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return (f"stdlib:{root}", *assign(_read_stdlib(root), cfg))


# -- local files ----------------------------------------------------------------------
def check_files(paths: list[str]) -> None:
    """One DataError naming every missing file and unsupported suffix."""
    problems = [f"{p!r}: no such file; check the path" for p in paths if not Path(p).is_file()]
    problems += [f"{p!r}: unsupported file type {Path(p).suffix or '(none)'!r}; supported are "
                 f"{', '.join(BUILDERS)}" for p in paths if Path(p).suffix.lower() not in BUILDERS]
    if problems:
        raise DataError("--data-files: " + "; ".join(problems))


@contextlib.contextmanager
def scratch_cache() -> Iterator[str]:
    """A ``datasets`` cache that lives only while the texts are read (see the module's docstring)."""
    with tempfile.TemporaryDirectory(prefix="smallgpt-datasets-") as folder:
        yield folder


def load_files(cfg) -> tuple[str, list[str], list[str]]:
    """Read --data-files through the packaged builders; documents keyed by their index."""
    check_files(cfg.data_files)
    datasets = _datasets()
    by_builder: dict[str, list[str]] = {}
    given: dict[str, str] = {}   # resolved path -> the path as the user wrote it, for messages
    for path in cfg.data_files:
        given[str(Path(path).resolve())] = path
        by_builder.setdefault(BUILDERS[Path(path).suffix.lower()], []).append(str(Path(path).resolve()))
    texts: list[str | None] = []
    for builder, paths in by_builder.items():
        # One .txt file is one document, which cannot be split; then paragraphs are the documents.
        kw = {"sample_by": "document" if len(paths) > 1 else "paragraph"} if builder == "text" else {}
        name = "text" if builder == "text" else cfg.text_column
        with scratch_cache() as cache:
            try:
                ds = datasets.load_dataset(builder, data_files=paths, split="train", cache_dir=cache, **kw)
            except Exception as exc:   # the library's message rarely says which file, or what is wrong
                raise DataError(unreadable(paths, given, builder, exc)) from exc
            texts += column(ds, name, f"--data-files {given[paths[0]]!r}")
    return ("files", *assign(_indexed(texts), cfg))


def unreadable(paths: list[str], given: dict[str, str], builder: str, exc: BaseException) -> str:
    """One line naming the file that cannot be read, what is wrong in it, and the fix."""
    for path in paths:
        if problem := file_problem(path, builder):
            return f"--data-files {given[path]!r}: {problem}"
    shown = " ".join(repr(given[p]) for p in paths)
    return f"--data-files {shown}: cannot be read ({brief(_root_cause(exc))}); fix the file or leave it out"


def file_problem(path: str, builder: str) -> str | None:
    """What makes one data file unreadable, found by reading it ourselves; None if nothing is found."""
    try:
        if builder == "parquet":
            import pyarrow.parquet as pq
            pq.read_schema(path)
            return None
        data = Path(path).read_bytes()
    except OSError as exc:
        return f"cannot be read ({brief(exc)}); check the file's permissions, or leave it out"
    except Exception as exc:    # pyarrow: not a Parquet file
        return f"is not a readable Parquet file ({brief(exc)}); pass a .parquet file, or leave it out"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return (f"is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}: a binary file?); "
                "pass a text file saved as UTF-8, or leave it out")
    return _json_problem(text) if builder == "json" else None


def _json_problem(text: str) -> str | None:
    """A JSON file holds one document (a list of rows, or an object) or one object per line."""
    try:
        json.loads(text)
        return None
    except ValueError:
        pass
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            return f"line {number} is not valid JSON ({exc}); fix that line, or leave the file out"
        if not isinstance(row, dict):
            return f"line {number} is not a JSON object ({type(row).__name__}); write one object per line"
    return None


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost exception of a chain (datasets wraps a parse error in its own)."""
    seen = {id(exc)}
    while (inner := exc.__cause__ or exc.__context__) is not None and id(inner) not in seen:
        exc = inner
        seen.add(id(exc))
    return exc


def column(ds, name: str, what: str) -> list[str | None]:
    if name not in ds.column_names:
        raise DataError(f"--text-column {name!r}: {what} has no such column; its columns are "
                        f"{', '.join(ds.column_names)}: pass one of them with --text-column")
    import pyarrow.types as pat
    values = ds.data.column(name)   # the arrow column: much faster than decoding row dicts
    if not (pat.is_string(values.type) or pat.is_large_string(values.type)):
        raise DataError(f"--text-column {name!r}: {what} holds {values.type}, not text: "
                        "pass the column that holds the documents' text")
    return values.to_pylist()


# -- datasets (a hub name or a local dataset directory) --------------------------------
def load_dataset_splits(cfg) -> tuple[str, list[str], list[str]]:
    """--dataset through datasets.load_dataset: its validation (else test) split, else a hash split."""
    name = cfg.dataset
    label = f"--dataset {name}" + (f" --dataset-config {cfg.dataset_config}" if cfg.dataset_config else "")
    local = os.path.isdir(name)
    if not local:
        require_hub(label, "pass local files with --data-files PATH... (.txt, .jsonl, .parquet) or a "
                    "local dataset directory with --dataset DIR, run where the hub is reachable, or "
                    "set HF_DATASETS_OFFLINE=1 to use a copy already in the datasets cache")
    # A local directory's arrow cache is a scratch one, as for --data-files; a hub dataset's
    # stays in the shared datasets cache, where HF_DATASETS_OFFLINE=1 finds it.
    with scratch_cache() if local else contextlib.nullcontext() as cache:
        splits = _load_dataset_dict(name, cfg.dataset_config, label, cache)
        if "train" not in splits:
            raise DataError(f"{label}: has no 'train' split (its splits are {', '.join(splits)}): "
                            "pick a dataset or configuration with a training split")
        held_out = next((s for s in ("validation", "test") if s in splits), None)
        train = column(splits["train"], cfg.text_column, label)
        held_out_texts = column(splits[held_out], cfg.text_column, label) if held_out else None
    train_texts, val_texts = assign(_indexed(train), cfg, has_val=held_out is not None)
    if held_out:
        val_texts = [t for _, t in _indexed(held_out_texts)]
    source = f"hf:{Path(name).resolve() if local else name}"
    return (source + (f"/{cfg.dataset_config}" if cfg.dataset_config else ""), train_texts, val_texts)


def _load_dataset_dict(name: str, config: str | None, label: str, cache_dir: str | None):
    datasets = _datasets()
    try:
        if any(os.path.isfile(os.path.join(name, f)) for f in ("dataset_dict.json", "state.json")):
            saved = datasets.load_from_disk(name)   # written by save_to_disk: load_dataset refuses it
            return saved if isinstance(saved, datasets.DatasetDict) else {"train": saved}
        return datasets.load_dataset(name, config, cache_dir=cache_dir)
    except ConnectionError as exc:   # offline mode, or the hub went away after the probe
        raise DataError(f"{label}: the Hugging Face hub could not be reached ({brief(exc)}) and no cached "
                        "copy was found: pass local files with --data-files PATH..., or run where "
                        "the hub is reachable") from exc
    except FileNotFoundError as exc:   # includes DatasetNotFoundError and EmptyDatasetError
        if os.path.isdir(name):
            raise DataError(f"{label}: the directory holds no data files that datasets can read "
                            f"({brief(exc)}): put train.txt (and validation.txt) or .jsonl/.parquet "
                            "files in it, or pass files with --data-files PATH...") from exc
        raise DataError(f"{label}: no such dataset on the hub and no such directory ({brief(exc)}): "
                        "check the name, or pass local files with --data-files PATH...") from exc
    except ValueError as exc:   # an unknown or missing configuration; the message lists the known ones
        raise DataError(f"{label}: {brief(exc)}; pass one of its configurations with "
                        "--dataset-config") from exc
    except OSError as exc:   # the hub refused (gated, private) or a file could not be read
        raise DataError(f"{label}: could not be loaded ({brief(exc)}): check the name and your "
                        "access to it, or pass local files with --data-files PATH...") from exc


def hub_offline(flags: tuple[str, ...] = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")) -> bool:
    """Whether the user asked the Hugging Face libraries to work from their caches only
    (each library honours its own variables; the defaults are transformers')."""
    return any(os.environ.get(f, "").strip().upper() in ("1", "ON", "YES", "TRUE") for f in flags)


def hub_endpoint() -> str:
    from huggingface_hub import constants
    return constants.ENDPOINT


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """One HEAD request with a short timeout: any HTTP answer means reachable.

    The libraries themselves retry a dead connection for 20-50 s before they give up.
    urllib honours the *_PROXY variables, as the hub client does.
    """
    try:
        with urllib.request.urlopen(urllib.request.Request(hub_endpoint(), method="HEAD"), timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False


def require_hub(label: str, fix: str) -> None:
    """Fail at once, naming the flag and the fix, when a download would only time out.
    In offline mode ``datasets`` reads its cache and fails fast by itself."""
    if not hub_offline(("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")) and not hub_reachable():
        raise DataError(f"{label}: the Hugging Face hub ({hub_endpoint()}) could not be reached, "
                        f"so nothing can be downloaded from it: {fix}")


def _datasets():
    import datasets   # slow to import (~1 s); the default corpus does not need it
    return datasets

"""The one configuration object of a training run: defined, checked once, passed down.

Every field carries its help text in ``metadata["help"]``; the command line of
``python -m trainer`` and ``python -m studies.search`` is generated from it, so a
field, its flag and its documentation cannot drift apart.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.recorder import REPORT_TO_CHOICES
from trainer.errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw", "muon")
ARCH_GPT2, ARCH_LLAMA = "gpt2", "llama"
ARCHES = (ARCH_GPT2, ARCH_LLAMA)     # --arch; a config or checkpoint without one is gpt2
DEVICES = ("auto", "cpu", "cuda")
CHECKPOINTING = ("auto", "true", "false")   # --gradient-checkpointing
DATA_FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with its command-line help attached."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # --- data -------------------------------------------------------------------------
    dataset: str | None = _f(None, "Hugging Face dataset name for datasets.load_dataset "
                             "(e.g. wikitext), or a local dataset directory. Default: the "
                             "Python standard library's own sources, which need no download.")
    dataset_config: str | None = _f(None, "Configuration of --dataset (e.g. wikitext-103-raw-v1).")
    data_files: list[str] = _f([], "Local .txt, .jsonl or .parquet files to train on "
                               "(instead of the default corpus).")
    text_column: str = _f("text", "Column that holds the text in --dataset / .jsonl / .parquet.")
    val_fraction: float = _f(0.05, "Fraction of documents held out for validation when the "
                             "source has no validation split (chosen by a hash of each document).")
    subset: float = _f(1.0, "Deterministic fraction of the training documents to use (0 < x <= 1).")
    # --- tokenizer --------------------------------------------------------------------
    tokenizer: str = _f("bpe", "'bpe' trains a byte-level BPE on the training split; anything "
                        "else is a pretrained tokenizer name (gpt2) or local directory.")
    vocab_size: int = _f(4096, "Vocabulary size of the trained byte-level BPE.")
    # --- model ------------------------------------------------------------------------
    arch: str = _f(ARCH_GPT2, "Model family, both with tied embeddings and a vocabulary padded to a multiple of 64: "
                   "gpt2 (learned positions, LayerNorm, GELU MLP, biases) or llama (rotary positions, RMSNorm, "
                   "SwiGLU, no biases; its MLP width keeps GPT-2's parameter count at the same size).",
                   choices=ARCHES)
    n_layer: int = _f(4, "Transformer blocks.")
    n_embd: int = _f(128, "Width of the residual stream.")
    n_head: int = _f(4, "Attention heads (must divide --n-embd).")
    block_size: int = _f(128, "Context length in tokens (one training sequence).")
    dropout: float = _f(0.0, "Dropout on embeddings, attention and residuals (--arch llama: on attention "
                        "only; Llama has no embedding or residual dropout).")
    # --- optimisation -----------------------------------------------------------------
    lr: float = _f(1e-3, "Peak learning rate of AdamW (with --optimizer muon, of the parameters "
                     "AdamW trains; Muon's is --muon-lr).")
    min_lr_ratio: float = _f(0.1, "Final learning rate as a fraction of --lr.")
    warmup_steps: int = _f(50, "Optimizer steps of linear warmup.")
    schedule: str = _f("cosine", "Decay after warmup: cosine, linear or constant.", choices=SCHEDULES)
    weight_decay: float = _f(0.1, "AdamW weight decay, applied to matrices only.")
    beta1: float = _f(0.9, "AdamW beta1.")
    beta2: float = _f(0.99, "AdamW beta2.")
    grad_clip: float = _f(1.0, "Clip the global gradient norm to this (0 disables).")
    optimizer: str = _f("adamw", "adamw, or muon: Muon (Nesterov momentum orthogonalised by Newton-Schulz) for the "
                        "blocks' 2-D weight matrices and AdamW (--lr, --weight-decay, --beta1/2) for the "
                        "embeddings, the output layer, norms and biases, in one optimizer.", choices=OPTIMIZERS)
    muon_lr: float = _f(0.02, "Peak learning rate of Muon's matrices with --optimizer muon (scaled by "
                        "sqrt(max(1, out/in)) per matrix; warmup and decay follow --schedule as --lr does).")
    muon_weight_decay: float = _f(0.0, "Muon's decoupled weight decay with --optimizer muon (lr x decay a step).")
    muon_momentum: float = _f(0.95, "Muon's Nesterov momentum with --optimizer muon.")
    micro_batch: int = _f(16, "Sequences per forward/backward pass ('auto' on the command line: the "
                          "largest that fits the GPU, keeping micro-batch x grad-accum).")
    auto_micro_batch: bool = _f(False, "Find the largest micro-batch that fits the GPU with headroom at the "
                                "start, keeping the effective batch (what --micro-batch auto sets).")
    grad_accum: int = _f(1, "Micro-batches accumulated per optimizer step.")
    epochs: int = _f(1, "Passes over the training tokens.")
    max_steps: int = _f(0, "Stop after this many optimizer steps (0: run all epochs).")
    precision: str = _f("auto", "auto (bf16 where supported, fp16+scaler on older GPUs), "
                        "fp32, bf16 or fp16.", choices=PRECISIONS)
    # --- evaluation, logging, saving ---------------------------------------------------
    eval_every: int = _f(100, "Evaluate every N optimizer steps (and at each epoch end).")
    eval_batches: int = _f(20, "Validation micro-batches per evaluation (0: the whole split).")
    log_every: int = _f(1, "Record step metrics every N optimizer steps.")
    save_every: int = _f(0, "Save a periodic checkpoint every N optimizer steps (0: only at epoch "
                         "ends and at the end).")
    save_on_eval: bool = _f(False, "Also save a checkpoint after every evaluation (kind 'best' when "
                            "it improved the best validation loss): a study's trial resumes from its last one.")
    keep_checkpoints: int = _f(4, "Keep the N newest checkpoints, plus the best by validation loss, "
                               "which is never deleted.")
    max_checkpoint_gb: float = _f(0.0, "Disk budget of this run's checkpoints in GB: the oldest are deleted "
                                  "to stay under it, never the newest or the best (0: no budget).")
    save_optimizer_state: bool = _f(True, "Save the AdamW state in checkpoints (twice the weights' size). "
                                    "false saves disk, but a resume from them restarts the optimizer.")
    # --- resuming and time limits ------------------------------------------------------
    resume: str = _f("", "'auto': continue from the newest valid checkpoint in --out and --resume-from "
                     "(start fresh when there is none); a checkpoint directory: continue from exactly "
                     "that one; empty: start fresh.")
    resume_from: list[str] = _f([], "More directories --resume auto searches for checkpoints of this "
                                "run, e.g. an uploaded Kaggle dataset under /kaggle/input.")
    time_budget: str = _f("", "Stop cleanly, with a checkpoint, before this much time has passed since "
                          "training started: e.g. 8h45m, 90m, 3600s.")
    deadline: str = _f("", "Stop cleanly, with a checkpoint, before this clock time: HH:MM (local, the "
                       "next one) or an ISO date-time.")
    max_nonfinite_steps: int = _f(5, "Non-finite losses or gradient norms in a row (each skips its update) "
                                  "before the last good checkpoint is reloaded with half the learning rate; "
                                  "a second streak ends the run as diverged.")
    clear_cache_every: int = _f(0, "Return cached GPU memory to the driver every N optimizer steps (0: never).")
    gradient_checkpointing: str = _f("auto", "Activation checkpointing (each block's activations are recomputed "
                                     "in backward: less memory, one more forward pass): true, false, or auto "
                                     "(turned on when out of memory at micro-batch 1, before giving up).",
                                     choices=CHECKPOINTING)
    early_stop_patience: int = _f(0, "Stop (completed) after N evaluations without an improvement of at least "
                                  "--early-stop-min-delta; final_model/ is then the best checkpoint (0: never).")
    early_stop_min_delta: float = _f(0.0, "The smallest drop of the validation loss that counts as an "
                                     "improvement for --early-stop-patience.")
    seed: int = _f(1337, "Seed for data order, initialisation and dropout.")
    device: str = _f("auto", "auto, cpu or cuda.", choices=DEVICES)
    progress: bool = _f(True, "Show a tqdm progress bar.")
    compile: bool = _f(False, "Compile the model with torch.compile (faster steps on a GPU after the first "
                       "ones compile; off by default).")
    report_to: str = _f("none", "Mirror the run to trackers as well as the experiment database: none, or a "
                        "comma list of tensorboard and wandb (W&B without a network: WANDB_MODE=offline).")
    wandb_project: str = _f("", "W&B project for --report-to wandb (default: the study name, else the run name).")
    # --- where things go --------------------------------------------------------------
    out_dir: str = _f("runs/run", "Directory for this run's checkpoints and final model.")
    cache_dir: str = _f(".cache/trainer", "Directory for the tokenizer and token caches.")
    run_name: str = _f("", "Name of the run in the experiment database (default: from --out).")

    def __post_init__(self) -> None:
        for name in ("data_files", "resume_from"):
            if isinstance(getattr(self, name), str):
                setattr(self, name, [getattr(self, name)])
        if isinstance(self.gradient_checkpointing, bool):   # YAML's true/false
            self.gradient_checkpointing = str(self.gradient_checkpointing).lower()

    # -- checks ------------------------------------------------------------------------
    def problems(self) -> list[str]:
        """Every problem with this config, each naming the flag, the value and the fix."""
        p: list[str] = []

        def need(ok: bool, name: str, fix: str) -> None:
            if not ok:
                p.append(f"{flag(name)} {getattr(self, name)!r}: {fix}")

        for name in ("n_layer", "n_embd", "n_head", "block_size", "micro_batch", "grad_accum",
                     "epochs", "eval_every", "log_every", "keep_checkpoints", "max_nonfinite_steps"):
            need(_is_int(getattr(self, name)) and getattr(self, name) > 0, name, "use a positive integer")
        for name in ("max_steps", "save_every", "warmup_steps", "eval_batches", "clear_cache_every",
                     "early_stop_patience"):
            need(_is_int(getattr(self, name)) and getattr(self, name) >= 0, name, "use an integer >= 0")
        need(_finite(self.lr) and self.lr > 0, "lr", "use a positive learning rate such as 3e-4")
        need(_finite(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "use a value in [0, 1]")
        need(_finite(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "use a value >= 0")
        need(_finite(self.grad_clip) and self.grad_clip >= 0, "grad_clip", "use a value >= 0 (0 disables)")
        need(_finite(self.muon_lr) and self.muon_lr > 0, "muon_lr", "use a positive learning rate such as 0.02")
        need(_finite(self.muon_weight_decay) and self.muon_weight_decay >= 0, "muon_weight_decay",
             "use a value >= 0 (0 is modded-nanogpt's)")
        need(_finite(self.muon_momentum) and 0 <= self.muon_momentum < 1, "muon_momentum",
             "use a value in [0, 1) such as 0.95")
        for name in ("save_on_eval", "save_optimizer_state", "progress", "auto_micro_batch", "compile"):
            need(isinstance(getattr(self, name), bool), name, "use true or false")
        need(_finite(self.max_checkpoint_gb) and self.max_checkpoint_gb >= 0, "max_checkpoint_gb",
             "use a size in GB such as 15, or 0 for no budget")
        need(_finite(self.early_stop_min_delta) and self.early_stop_min_delta >= 0, "early_stop_min_delta",
             "use a loss difference >= 0 such as 0.01")
        need(_finite(self.dropout) and 0 <= self.dropout < 1, "dropout", "use a value in [0, 1)")
        need(_finite(self.beta1) and 0 <= self.beta1 < 1, "beta1", "use a value in [0, 1)")
        need(_finite(self.beta2) and 0 <= self.beta2 < 1, "beta2", "use a value in [0, 1)")
        need(_finite(self.val_fraction) and 0 < self.val_fraction < 1, "val_fraction", "use a value in (0, 1)")
        need(_finite(self.subset) and 0 < self.subset <= 1, "subset", "use a fraction in (0, 1]")
        need(_is_int(self.vocab_size) and 256 < self.vocab_size <= 65535, "vocab_size",
             "use 257..65535 (byte-level BPE needs the 256 bytes plus merges; tokens are stored as uint16)")
        for name, choices in (("precision", PRECISIONS), ("schedule", SCHEDULES), ("device", DEVICES),
                              ("gradient_checkpointing", CHECKPOINTING), ("optimizer", OPTIMIZERS),
                              ("arch", ARCHES)):
            need(getattr(self, name) in choices, name, f"choose one of {', '.join(choices)}")
        if _is_int(self.n_embd) and _is_int(self.n_head) and self.n_head > 0 and self.n_embd % self.n_head:
            p.append(f"--n-embd {self.n_embd} is not divisible by --n-head {self.n_head}: "
                     "pick a width that is a multiple of the number of heads")
        p += report_to_problems(self.report_to)
        p += self._data_file_problems() + self._folder_problems() + self._resume_problems() + self._time_problems()
        if self.dataset and self.data_files:
            p.append("--dataset and --data-files both given: pass only one data source")
        if self.dataset_config and not self.dataset:
            p.append(f"--dataset-config {self.dataset_config!r} without --dataset: name the dataset too")
        need(isinstance(self.text_column, str) and self.text_column.strip() != "", "text_column",
             "name the column that holds the text, e.g. --text-column text")
        return p

    def _data_file_problems(self) -> list[str]:
        p = []
        for path in self.data_files:
            if not Path(path).is_file():
                p.append(f"--data-files {path!r}: no such file; check the path (or leave out --data-files "
                         "to train on the default corpus)")
            elif Path(path).suffix.lower() not in DATA_FILE_SUFFIXES:
                p.append(f"--data-files {path!r}: unsupported file type; use {', '.join(DATA_FILE_SUFFIXES)}")
            elif Path(path).stat().st_size == 0:
                p.append(f"--data-files {path!r}: the file is empty; pass a file that holds text")
        return p

    def _folder_problems(self) -> list[str]:
        """--out and --cache-dir must be directories this process can write, or be creatable."""
        p = []
        for flag_name, value in (("--out", self.out_dir), ("--cache-dir", self.cache_dir)):
            if isinstance(value, str) and (problem := folder_problem(Path(value))):
                p.append(f"{flag_name} {value!r}: {problem}")
        return p

    def _resume_problems(self) -> list[str]:
        p = []
        if not isinstance(self.resume, str):
            p.append(f"--resume {self.resume!r}: pass 'auto' or a checkpoint directory")
        elif self.resume not in ("", "auto") and not Path(self.resume).is_dir():
            p.append(f"--resume {self.resume!r}: no such checkpoint directory; pass 'auto' to pick the "
                     "newest valid checkpoint, or the path of a step-NNNNNNN directory")
        for path in self.resume_from:
            if not Path(path).is_dir():
                p.append(f"--resume-from {path!r}: no such directory; pass directories that hold checkpoints")
        if self.resume_from and self.resume != "auto":
            p.append(f"--resume-from given with --resume {self.resume!r}: it is searched only by "
                     "--resume auto; add --resume auto")
        return p

    def _time_problems(self) -> list[str]:
        from trainer.clock import parse_deadline, parse_duration

        p = []
        for name, parse in (("time_budget", parse_duration), ("deadline", parse_deadline)):
            value = getattr(self, name)
            if not isinstance(value, str):
                p.append(f"{flag(name)} {value!r}: pass the limit as text, e.g. 8h45m or 21:30")
                continue
            try:
                if value:
                    parse(value)
            except ValueError as exc:
                p.append(f"{flag(name)} {value!r}: {exc}")
        return p

    def check(self) -> "TrainConfig":
        """Raise one ConfigError listing every problem; return self when there are none."""
        problems = self.problems()
        if problems:
            raise ConfigError(problems)
        return self

    # -- conversions -------------------------------------------------------------------
    @property
    def effective_batch(self) -> int:
        return self.micro_batch * self.grad_accum

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "TrainConfig":
        unknown = set(changes) - field_names()
        if unknown:
            raise ConfigError([f"unknown setting {k!r}: known settings are {', '.join(sorted(field_names()))}"
                               for k in sorted(unknown)])
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, values: dict[str, Any], base: "TrainConfig | None" = None) -> "TrainConfig":
        return (base or cls()).replace(**values)


def field_names() -> set[str]:
    return {f.name for f in dataclasses.fields(TrainConfig)}


def flag(name: str) -> str:
    """The command-line flag of a config field: n_embd -> --n-embd."""
    return "--" + name.replace("_", "-")


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON config file into a dict of settings (checked by the caller)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"--config {str(path)!r}: no such file; pass the path of a YAML or JSON config"])
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            values = json.loads(text)
        else:
            import yaml
            values = yaml.safe_load(text)
    except Exception as exc:  # the parser's own message says where
        raise ConfigError([f"--config {str(path)!r}: cannot be parsed ({exc}); fix the file's syntax"]) from exc
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError([f"--config {str(path)!r}: expected a mapping of setting: value at the top level"])
    # Files written by studies.report and training_config.json nest settings under "config".
    if "config" in values and isinstance(values["config"], dict):
        values = values["config"]
    return {k.replace("-", "_"): v for k, v in values.items()}


def folder_problem(path: Path) -> str | None:
    """Why ``path`` cannot be used (or created) as a directory to write in; None when it can."""
    if path.exists() and not path.is_dir():
        return "it is a file, not a directory; pass a directory name"
    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, so no directory can be made under it; pass another path"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable; pass a path in a writable directory"
    return None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def report_to_problems(value: str) -> list[str]:
    """--report-to names every tracker it asks for correctly (the mirrors themselves live in expdb)."""
    names = [n.strip().lower() for n in str(value).split(",") if n.strip()]
    unknown = [n for n in names if n not in REPORT_TO_CHOICES]
    if unknown:
        return [f"--report-to {value!r}: unknown tracker {', '.join(map(repr, unknown))}; choose from "
                f"{', '.join(REPORT_TO_CHOICES)}, comma-separated (e.g. --report-to wandb,tensorboard)"]
    if "none" in names and len(names) > 1:
        return [f"--report-to {value!r}: 'none' cannot be combined with a tracker; drop one of them"]
    return []

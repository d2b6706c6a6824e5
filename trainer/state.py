"""Where a run is: everything besides tensors that an exact resume needs, as JSON."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from trainer.batching import Batching, Split  # noqa: F401 - Split: its older home
from trainer.files import json_float

_FLOATS = ("best_val_loss", "last_val_loss", "best_val_bpb", "last_val_bpb", "last_val_word_ppl")


@dataclass
class TrainState:
    step: int = 0                # optimizer steps completed
    epoch: int = 0               # epoch in progress (0-based)
    sample_pos: int = 0          # sequences of this epoch's order already consumed
    tokens_seen: int = 0
    micro_batch: int = 0         # micro_batch, grad_accum and world_size: the batching (``batching``),
    grad_accum: int = 0          # kept as three keys, as checkpoints have always held them
    best_val_loss: float = math.inf
    best_step: int = -1
    last_val_loss: float = math.nan
    last_eval_step: int = -1     # the step last_val_loss was measured at
    # Bits per byte and word perplexity (trainer.data.text_measure): at best_step, and at last_eval_step.
    # NaN until measured, and in a checkpoint older than them.
    best_val_bpb: float = math.nan
    last_val_bpb: float = math.nan
    last_val_word_ppl: float = math.nan
    run_id: int | None = None
    run_uid: str | None = None   # the run row's uid: it names the row in any database (ids are per file)
    epoch_seconds: float = 0.0   # time spent in the epoch in progress, summed over resumes
    epoch_losses: list[float] = field(default_factory=list)  # step losses of the epoch in progress
    lr_scale: float = 1.0        # halved once after a streak of non-finite steps
    nonfinite_streak: int = 0    # non-finite steps in a row (updates skipped)
    nonfinite_total: int = 0
    scaler_skips: int = 0        # fp16 steps the gradient scaler skipped (overflow)
    oom_recoveries: int = 0
    world_size: int = 1          # processes training together (torchrun)
    # (step, val_loss) of every evaluation, oldest first: what early stopping decides on.
    eval_history: list[tuple[int, float]] = field(default_factory=list)
    gradient_checkpointing: bool = False   # turned on by --gradient-checkpointing auto after an OOM

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        # JSON has no inf/nan; keep them as strings so the file stays standard JSON.
        for k in _FLOATS:
            d[k] = json_float(d[k])
        d["epoch_losses"] = [json_float(x) for x in d["epoch_losses"]]
        d["eval_history"] = [[step, json_float(loss)] for step, loss in d["eval_history"]]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "TrainState":
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}   # older checkpoints lack newer fields
        for k in _FLOATS:
            if k in d:
                d[k] = float(d[k])
        d["epoch_losses"] = [float(x) for x in d.get("epoch_losses", [])]
        d["eval_history"] = [(int(step), float(loss)) for step, loss in d.get("eval_history", [])]
        return cls(**d)

    @property
    def batching(self) -> Batching:
        """How this run's steps are batched now (lowered after an out-of-memory error, perhaps)."""
        return Batching(self.micro_batch, self.grad_accum, self.world_size)

    @batching.setter
    def batching(self, batching: Batching) -> None:
        self.micro_batch, self.grad_accum, self.world_size = (batching.micro_batch, batching.grad_accum,
                                                              batching.world_size)

    @property
    def evaluated_now(self) -> bool:
        """True when the validation loss was measured at the current step."""
        return self.last_eval_step == self.step and math.isfinite(self.last_val_loss)


"""The figures of bench.quality, read from its curves (bench.curves): each contender's rows and
line of the summary table, the ratios to the reference loop, the targets and the headline; and the
loss's peak memory at kaggle-t4 size (bench.peak_memory), which the same issue asks for: resident
memory on the CPU in fp32, allocated CUDA memory on a GPU in fp16.
"""
from __future__ import annotations

import math
import statistics
import sys
from typing import Any

from bench.common import ratio, row, summary, target
from bench.curves import Run
from trainer.flops import Peak

TARGET_TIME_RATIO = 0.6      # (d) reaches (a)'s final bpb in at most this share of (a)'s time
TARGET_BPB_GAIN = 0.03       # (d)'s bpb at the largest budget at least 3 % below (a)'s
TARGET_LOSS_MEMORY = 0.5     # the chunked loss's peak at kaggle-t4 size, against the full logits'
EQUAL_LOSS = 1e-6            # the chunked loss's relative difference from the full one (fp32: summation order)
EQUAL_GRADS = 1e-5           # its largest gradient difference, relative to the largest gradient
# In fp16 (a GPU) the chunk's products may round differently from the whole logits' (another cuBLAS
# kernel for another shape): fp16's 11-bit mantissa, not the summation order, bounds the difference.
EQUAL_FP16 = {"loss": 1e-3, "grads": 1e-2}
LOSS_PRECISION = {"cpu": "fp32", "cuda": "fp16"}


def contender_rows(name: str, runs: list[Run], finals: list[float], budgets_min: tuple[float, ...],
                   peak: Peak, precision: str = "fp32") -> tuple[list[dict], dict[str, Any]]:
    """A contender's rows, and its line of the summary table (``grid``)."""
    bpb = [row(f"{name}: bpb at {b:g} min", [r.bpb_at(60 * b) for r in runs], "bits/byte", higher_is_better=False)
           for b in budgets_min]
    reached = [t for t in (r.time_to(f) for r, f in zip(runs, finals)) if t is not None]
    note = f"reached in {len(reached)} of {len(runs)} seeds"
    speed = row(f"{name}: tokens/s", [r.tokens_per_s for r in runs], "tokens/s")
    mfu = row(f"{name}: MFU", [100 * r.flops_per_token * r.tokens_per_s / peak.flops for r in runs], "%",
              note=f"trainer.flops: FLOPs per token x tokens/s over the measured {precision} matmul peak")
    rows = bpb + ([row(f"{name}: time to (a)'s final bpb", reached, "s", higher_is_better=False, note=note)]
                  if reached else []) + [
        speed, mfu, row(f"{name}: parameters", [r.n_params for r in runs], ""),
        row(f"{name}: steps planned for the largest budget", [r.planned_steps for r in runs], "steps"),
        row(f"{name}: steps taken", [r.points[-1].step for r in runs], "steps"),
        row(f"{name}: training time at the end", [r.points[-1].seconds for r in runs], "s",
            note="below the largest budget by more than a step where its planned steps ran out first")]
    line = {"n_params": runs[0].n_params, "bpb": [summary(r["values"]) for r in bpb],
            "time_to_target": summary(reached) if reached else None, "reached": len(reached), "seeds": len(runs),
            "tokens_per_s": summary(speed["values"]), "mfu_percent": summary(mfu["values"])}
    return rows, line


def time_ratios(top: list[float | None], bottom: list[float | None]) -> list[float]:
    """top / bottom per seed; infinite where top never got there (infinitely slow)."""
    return [a / b if a is not None else math.inf for a, b in zip(top, bottom) if b]


def comparisons(runs: dict[str, list[Run]], base: str, new: str, finals: list[float], largest_s: float
                ) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """Every other contender against ``base`` ((a)): time to its final bpb and bpb at the largest
    budget, per seed; the two quality targets of ``new`` ((d)); the headline, new's time over base's."""
    times = {n: [r.time_to(f) for r, f in zip(rs, finals)] for n, rs in runs.items()}
    at_end = {n: [r.bpb_at(largest_s) for r in rs] for n, rs in runs.items()}
    ratios = []
    for name in [new] + [n for n in runs if n not in (base, new)]:
        reached = [x for x in time_ratios(times[name], times[base]) if math.isfinite(x)]
        if reached:
            ratios.append({"name": f"time to (a)'s final bpb: {name} / {base}", **summary(reached),
                           "note": f"per seed, over the {len(reached)} of {len(finals)} seeds where it got there"})
        ratios.append(ratio(f"bpb at {largest_s / 60:g} min: {name} / {base}", at_end[name], at_end[base]))
    # A seed where (d) never got there counts as infinitely slow: the median says so if most did not.
    headline = time_ratios(times[new], times[base])
    gain = 1 - ratio("", at_end[new], at_end[base])["median"]
    targets = [target(f"time to (a)'s final bpb: {new} / {base}", statistics.median(headline), TARGET_TIME_RATIO,
                      at_least=False),
               target(f"bpb at {largest_s / 60:g} min: {new} below {base}, 1 - ratio", gain, TARGET_BPB_GAIN)]
    reached = sum(t is not None for t in times[new])
    head = {"name": f"time to (a)'s final bpb: {new} / {base}", "reached_in": reached, "seeds": len(headline),
            "ratio": summary(headline) if reached else None}
    return ratios, targets, head


def loss_memory(smoke: bool, device: str = "cpu") -> tuple[list[dict], list[dict], list[str]]:
    """The loss alone at kaggle-t4 size, full logits against chunks (bench.peak_memory --loss; fp32 in
    fresh processes on the CPU, fp16 in this one on a GPU): rows, targets, notes."""
    if smoke:
        return [], [], ["loss peak memory at kaggle-t4 size: not measured in a smoke run "
                        "(python -m bench.peak_memory --loss measures it alone)"]
    from bench.peak_memory import child, run_losses
    from trainer.loss import DEFAULT_CHUNK_TOKENS

    precision = LOSS_PRECISION[device]
    if device == "cuda":      # the allocator's peak, reset per configuration: this process will do
        measured = run_losses(precision, 3, device)
    else:
        # Measured from a fresh interpreter: Linux carries a process's peak RSS over fork and exec into
        # its child, so children of this one, which holds four models, would start above their own peak.
        measured = child([sys.executable, "-c", "import json; from bench.peak_memory import run_losses; "
                          "print(json.dumps(run_losses('fp32', 3)))"])
    full = measured[0]
    equal_loss, equal_grads = (EQUAL_FP16["loss"], EQUAL_FP16["grads"]) if precision == "fp16" else (
        EQUAL_LOSS, EQUAL_GRADS)
    what = "peak CUDA memory allocated" if device == "cuda" else "peak"
    chunked = next(r for r in measured if r["loss_chunk_tokens"] == DEFAULT_CHUNK_TOKENS)

    def label(r: dict) -> str:
        return f"chunks of {r['loss_chunk_tokens']} tokens" if r["loss_chunk_tokens"] else "full logits"
    rows = [row(f"loss at kaggle-t4 size, {label(r)}: {what} above its inputs", [r["loss_peak_mb"]], "MB",
                higher_is_better=False) for r in measured]
    rows += [row(f"loss at kaggle-t4 size, {label(r)}: loss relative difference from the full logits'",
                 [r["loss_rel_diff"]], "", higher_is_better=False) for r in measured[1:]]
    name = f"loss peak at kaggle-t4 size: {label(chunked)} (the default) / full logits"
    targets = [target(name, chunked["loss_peak_mb"] / full["loss_peak_mb"], TARGET_LOSS_MEMORY, at_least=False),
               target(f"{label(chunked)}: loss relative difference from the full logits'", chunked["loss_rel_diff"],
                      equal_loss, at_least=False),
               target(f"{label(chunked)}: largest gradient difference / largest gradient",
                      chunked["grad_max_rel_diff"], equal_grads, at_least=False)]
    how = ("fp16 autocast on cuda:0: the peak allocated CUDA memory above its inputs (bench.peak_memory --loss "
           "--device cuda --precision fp16)" if device == "cuda" else
           "fp32, each in a fresh process: the peak resident memory above its inputs (bench.peak_memory --loss)")
    notes = ["loss at kaggle-t4 size: projection and cross-entropy alone on hidden states of one micro-batch "
             f"(8 x 512 tokens x 256, vocabulary 50,257), forward and backward, {how}"]
    return rows, targets, notes

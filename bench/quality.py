"""Time to quality: validation bits per byte against training time, four recipes side by side.

    python -m bench quality                         # budgets of 1, 2 and 3 minutes, 3 seeds: ~50 minutes
    python -m bench quality --budgets 2,5,10        # the issue's budgets (about 2.5 hours on 2 cores)
    python -m bench quality --corpus wikitext       # WikiText-2 from ../shared/data (the bench only)
    python -m bench quality --device cuda --budgets 0.1,0.2 --repeats 1   # on cuda:0, as .ci/gpu-check runs it

Not part of a plain ``python -m bench`` (every other part): it trains each contender for minutes.
One model size, one token stream and the same tokens per optimizer step for every contender:

(a) the reference recipe as a plain PyTorch loop: bench.plain_loop (nanoGPT's random offsets,
    AdamW with decay on matrices, warmup and cosine decay; the trainer's default lr and betas),
    GPT-2 blocks;
(b) the Hugging Face Trainer with its own defaults for that model (bench.hf_trainer.run_hf_defaults);
(c) this trainer with today's defaults (AdamW, GPT-2 blocks);
(d) this trainer with the new recipe, --optimizer muon --arch llama (``--recipe-arch gpt2``: Muon
    alone, on GPT-2 blocks).

Per seed, the four run interleaved, one optimizer step each in turn (bench.interleave), so the
machine's load drifts hit all alike, and the order rotates from seed to seed. A contender's
training clock counts only the time it held the turn, from the end of its first step (set-up
left out alike), evaluations excluded. Schedules: a contender's steps are not known in advance,
so before each seed the four run a few steps interleaved, and each one's learning-rate schedule
and step limit are the largest budget over its own seconds per step (the same rule for all).
Every model is scored by one evaluation (``Validation``): the trainer's fixed validation blocks,
the sum of next-token losses over their bytes, outside the training clock, every ``eval_every``
steps, after the first step, before each budget and at the end. fp32 throughout: a CPU without
native bf16 runs bf16 many times slower, so the machine's native precision is compared.

``--device cuda``: the same on cuda:0 at the kaggle-t4 preset's size (8 layers x 256, 8 heads,
block 512, micro-batch 8: bench.quality_sizes.GPU), on the same offline corpus (the GPU machine has
no network), in fp16 with a gradient scaler for all four, as a T4 trains, even on a GPU with bf16:
(a) autocast and GradScaler, (b) TrainingArguments(fp16=True), (c)/(d) --precision fp16. The shared
evaluation runs under the same autocast; CUDA is synchronised before every clock reading; MFU is
against the measured fp16 matmul peak; the peak allocated CUDA memory is per seed (the four share
the GPU turn by turn, so no one's own peak can be told apart), and the loss's peak at kaggle-t4 size
is the allocator's, in fp16. Without a GPU, ``--device cuda`` is refused before anything runs. Not
yet run on a GPU when written (none was lent): .ci/gpu-check's bench_quality step is its first run.
"""
from __future__ import annotations

import math
import shutil
import statistics
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch

from bench.common import StepClock, load_average, load_text, machine, part, row, summary
from bench.curves import BudgetReached, CudaPeak, Run, Validation, Watch, WatchRecorder
from bench.hf_trainer import run_hf_defaults
from bench.interleave import run_interleaved
from bench.plain_loop import run_plain
from bench.quality_figures import comparisons, contender_rows, loss_memory
from bench.quality_sizes import NO_EVAL, Sizes, sizes_for
from trainer.config import TrainConfig
from trainer.data import PreparedData, prepare_data
from trainer.device import place
from trainer.flops import Peak, flops_per_token, probe_peak_flops
from trainer.model import count_parameters

PLAIN = "(a) plain loop"
HF = "(b) HF Trainer, its defaults"
TODAY = "(c) trainer, today's defaults"
NEW = "(d) trainer, new recipe"
# -- the contenders ----------------------------------------------------------------------
def run_ours(cfg: TrainConfig, data: PreparedData, out_dir: Path, watch: Watch) -> None:
    """The trainer's own loop (trainer.loop.Trainer.run_steps), set up as trainer.run.train sets it
    up; the run's row, final checkpoint and export, which follow the steps, are left out."""
    from trainer.checkpoints import plan_resume
    from trainer.clock import StopClock
    from trainer.device import place
    from trainer.distributed import World
    from trainer.interrupts import StopRequests
    from trainer.loop import Trainer
    from trainer.setup import setup

    cfg, recorder, quiet = cfg.replace(out_dir=str(out_dir)), WatchRecorder(watch), lambda *_: None
    parts, state, _ = setup(cfg, data, place(cfg), World.from_env(), recorder, quiet, plan_resume(cfg))
    loop = Trainer(parts, state, recorder, StopRequests(), StopClock.for_limits("", ""), log=quiet)
    watch.watch(parts.model)
    try:
        loop.run_steps()
    finally:
        if parts.store:
            parts.store.drain()      # an epoch end's checkpoint in flight, before its folder goes


def run_plain_loop(cfg: TrainConfig, data: PreparedData, out_dir: Path, watch: Watch) -> None:
    """In the shared precision: fp16 is autocast with a GradScaler (bench.plain_loop)."""
    run_plain(cfg, data, cfg.precision, out_dir, watch, on_model=watch.watch)


def run_hf(cfg: TrainConfig, data: PreparedData, out_dir: Path, watch: Watch) -> None:
    run_hf_defaults(cfg, data, out_dir, watch, watch.watch)


Loop = Callable[[TrainConfig, PreparedData, Path, Watch], None]
Specs = dict[str, tuple[Loop, dict[str, Any]]]       # each contender's loop, and its settings over the shared config


def contenders(recipe_arch: str) -> Specs:
    """Each contender's loop and its settings over the shared config (TrainConfig's defaults)."""
    return {PLAIN: (run_plain_loop, {}), HF: (run_hf, {}), TODAY: (run_ours, {}),
            NEW: (run_ours, {"optimizer": "muon", "arch": recipe_arch})}


def interleaved(specs: Specs, order: list[str], cfg: TrainConfig,
                data: PreparedData, steps: dict[str, int], watch: Callable[[StepClock, int], Watch],
                sync: Callable[[], None] | None = None) -> dict[str, Watch]:
    """Every contender of ``order`` for at most its ``steps``, interleaved step by step, each in a
    fresh folder; the watch of each. ``sync`` runs before every clock reading (on a GPU, CudaPeak:
    a step's work is queued, and must count to the step that queued it)."""
    watches: dict[str, Watch] = {}

    def loop(name: str, out_dir: Path) -> Callable[[StepClock], None]:
        run, settings = specs[name]

        def body(clock: StepClock) -> None:
            watches[name] = watch(clock, steps[name])
            try:
                run(cfg.replace(max_steps=steps[name], **settings), data, out_dir, watches[name])
            except BudgetReached:
                pass
        return body

    work = Path(tempfile.mkdtemp(prefix="bench-quality-"))
    try:
        run_interleaved({n: loop(n, work / f"c{i}") for i, n in enumerate(order)}, sync=sync)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return watches


def planned_steps(specs: Specs, order: list[str], cfg: TrainConfig, data: PreparedData,
                  sizes: Sizes, sync: Callable[[], None] | None = None) -> dict[str, int]:
    """Each contender's steps in the largest budget: the budget over its median step time in a few
    interleaved steps after a warm-up (the median: a step that a burst of load slowed does not count).
    The length of its learning-rate schedule, and its step limit."""
    first, last = sizes.calibration_warmup, sizes.calibration_warmup + sizes.calibration_steps
    watches = interleaved(specs, order, cfg, data, {n: last for n in order},
                          lambda clock, steps: Watch(clock, None, [math.inf], NO_EVAL, steps), sync)
    budget_s = 60 * max(sizes.budgets_min)
    step_s = {n: statistics.median(w.clock.stamps[i] - w.clock.stamps[i - 1] for i in range(first + 1, last + 1))
              for n, w in watches.items()}
    return {n: max(1, int(budget_s / s)) for n, s in step_s.items()}


# -- one seed ------------------------------------------------------------------------------
def one_seed(specs: Specs, order: list[str], cfg: TrainConfig, data: PreparedData, validation: Validation,
             sizes: Sizes, sync: Callable[[], None] | None = None) -> dict[str, Run]:
    steps = planned_steps(specs, order, cfg, data, sizes, sync)
    budgets_s = [60 * b for b in sizes.budgets_min]
    watches = interleaved(specs, order, cfg, data, steps,
                          lambda clock, last: Watch(clock, validation, budgets_s, sizes.eval_every, last), sync)
    return {n: Run(w.points, steps[n], count_parameters(w.model), flops_per_token(w.model, sizes.block_size),
                   sizes.tokens_per_step) for n, w in watches.items()}


def all_seeds(specs: Specs, cfg: TrainConfig, data: PreparedData, validation: Validation, sizes: Sizes, repeats: int,
              log: Callable[[str], None]) -> tuple[dict[str, list[Run]], list[dict[str, Any]]]:
    """Every contender once per seed; the order rotates (a b c d, b c d a, ...) so none always
    follows the same one. The load average before and after each seed, and on a GPU its peak
    allocated memory (``peak_cuda_mb``: the four's together, as they share the GPU)."""
    names = list(specs)
    runs: dict[str, list[Run]] = {n: [] for n in names}
    loads = []
    for s in range(repeats):
        order = names[s % len(names):] + names[:s % len(names)]
        before = load_average()
        gpu = CudaPeak() if cfg.device == "cuda" else None
        for name, one in one_seed(specs, order, cfg.replace(seed=cfg.seed + s), data, validation, sizes,
                                  gpu).items():
            runs[name].append(one)
        loads.append({"before": before, "after": load_average(), **({"peak_cuda_mb": gpu.mb} if gpu else {})})
        log(f"  seed {s + 1}/{repeats} ({load_text()}): " + ", ".join(
            f"{n} {r[-1].points[-1].bpb:.3f} bpb after {r[-1].points[-1].seconds:.0f} s" for n, r in runs.items()))
    return runs, loads


def settings(sizes: Sizes, data: PreparedData, validation: Validation, peak: Peak, recipe_arch: str,
             repeats: int) -> dict[str, Any]:
    if sizes.device == "cuda":
        where = {"gpu": torch.cuda.get_device_name(0),
                 "precision": "fp16 with a gradient scaler, as on a T4 (forced, whatever the GPU)"}
    else:
        native_bf16 = machine().get("cpu_bf16")
        where = {"precision": "fp32 (the CPU has native bf16)" if native_bf16 else "fp32: this CPU has no native bf16"}
    return {**asdict(sizes), "corpus": data.dataset_identity["source"], "train_tokens": len(data.train),
            "vocab": data.vocab_size, "eval_tokens": validation.tokens, "eval_bytes": validation.bytes,
            "seeds": repeats, "threads": torch.get_num_threads(), "new_recipe_arch": recipe_arch, **where,
            f"{sizes.precision}_peak": f"{peak.flops / 1e9:.1f} GFLOP/s ({peak.how})"}


def notes(sizes: Sizes, recipe_arch: str) -> list[str]:
    return [f"{PLAIN}: bench.plain_loop with TrainConfig's AdamW settings (lr, betas, weight decay, warmup, cosine "
            f"to min_lr_ratio), GPT-2 blocks; {HF}: transformers.Trainer with its own recipe (lr 5e-5, linear decay "
            f"to 0, no warmup, no weight decay, betas 0.9/0.999); {TODAY}: TrainConfig's defaults; {NEW}: "
            f"--optimizer muon --arch {recipe_arch}. No checkpoints, but for the trainer's own at an epoch end",
            "bpb at a budget: the last evaluation at or before it (every contender is evaluated after its last "
            "step before each budget, foreseen as the step after which one more step as long would pass it); time "
            "to (a)'s final bpb: the first evaluation at or below (a)'s bpb at the largest budget of the same seed, "
            "interpolated linearly in time from the evaluation before it",
            "schedules: each contender's learning-rate schedule and step limit are the largest budget over its "
            f"seconds per step in {sizes.calibration_steps} interleaved steps (after {sizes.calibration_warmup}) run "
            "just before each seed: the same rule for all", precision_note(sizes.device)]


def precision_note(device: str) -> str:
    if device == "cuda":
        return ("fp16 for all four, as a T4 trains: (a) autocast with a GradScaler, (b) TrainingArguments(fp16=True), "
                "(c)/(d) --precision fp16; the shared evaluation under the same autocast; CUDA synchronised before "
                "every clock reading")
    return ("bf16 is not compared: this CPU runs bf16 many times slower than fp32, so every contender runs in the "
            "precision the machine runs natively")


def memory_rows(loads: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A GPU run's peak allocated memory per seed (none on the CPU)."""
    peaks = [x["peak_cuda_mb"] for x in loads if "peak_cuda_mb" in x]
    return [row("peak CUDA memory allocated in a seed, the four together", peaks, "MB", higher_is_better=False,
                note="interleaved on one GPU, so no contender's own peak can be told apart")] if peaks else []


def report(runs: dict[str, list[Run]], loads: list[dict], sizes: Sizes, data: PreparedData,
           validation: Validation, peak: Peak, recipe_arch: str, repeats: int, smoke: bool) -> dict[str, Any]:
    largest_s = 60 * max(sizes.budgets_min)
    finals = [r.bpb_at(largest_s) for r in runs[PLAIN]]      # (a)'s final bpb, per seed: the bar to reach
    rows, grid = [], {}
    for name, rs in runs.items():
        mine, grid[name] = contender_rows(name, rs, finals, sizes.budgets_min, peak, sizes.precision)
        rows += mine
    ratios, targets, headline = comparisons(runs, PLAIN, NEW, finals, largest_s)
    loss_rows, memory_targets, memory_notes = loss_memory(smoke, sizes.device)
    return part(
        "Time to quality" + (" on a GPU (kaggle-t4 size, fp16)" if sizes.device == "cuda" else ""),
        settings=settings(sizes, data, validation, peak, recipe_arch, repeats),
        method=("per seed, the four contenders run interleaved, one optimizer step each in turn (the order rotates "
                "from seed to seed), each from the same seed on the same token stream; a contender's training time "
                "is the time it held the turn from the end of its first step, evaluations excluded; every model is "
                "scored by one shared evaluation of the trainer's fixed validation blocks (bits per byte of their "
                "text). Ratios: median over seeds of the per-seed ratio"),
        rows=rows + memory_rows(loads) + loss_rows, ratios=ratios, targets=targets + memory_targets,
        notes=notes(sizes, recipe_arch) + memory_notes, repeats=repeats, smoke=smoke,
        extra={"load_average": {"per_round": [x["after"] for x in loads], "before_after": loads},
               "grid": {"budgets_min": list(sizes.budgets_min), "target_bpb": summary(finals), "contenders": grid},
               "headline": headline,
               "curves": {n: [[[p.seconds, p.step, p.bpb] for p in r.points] for r in rs] for n, rs in runs.items()}})


def run(repeats: int, smoke: bool, cache_dir: str, budgets: tuple[float, ...] | None = None,
        corpus: str = "offline", recipe_arch: str = "llama", log: Callable[[str], None] = print,
        device: str = "cpu") -> dict[str, Any]:
    sizes = sizes_for(smoke, device, budgets)
    cfg = sizes.config(cache_dir, corpus)
    placement = place(cfg)          # the contenders' device and autocast, for the shared evaluation too
    data = prepare_data(cfg, log=lambda *_: None)
    validation = Validation(data, sizes.block_size, sizes.micro_batch, sizes.eval_batches, placement.device,
                            placement.autocast)
    specs = contenders(recipe_arch)
    # Probed now rather than read from the machine's cache: a peak cached under another load would
    # misstate this run's MFU (trainer.flops caches the first probe for good).
    peak = probe_peak_flops(placement.device, placement.autocast_dtype or torch.float32)
    log(f"quality: {len(data.train):,} training tokens, {len(specs)} contenders interleaved, up to "
        f"{max(sizes.budgets_min):g} min of training each, {repeats} seeds ({load_text()})")
    runs, loads = all_seeds(specs, cfg, data, validation, sizes, repeats, log)
    result = report(runs, loads, sizes, data, validation, peak, recipe_arch, repeats, smoke)
    h = result["headline"]
    log(f"  {h['name']}: " + (f"{h['ratio']['median']:.3f} ({h['ratio']['min']:.3f} - {h['ratio']['max']:.3f}), "
                              f"reached in {h['reached_in']} of {h['seeds']} seeds" if h["ratio"] else "not reached"))
    for t in result["targets"]:
        log(f"  target {t['name']} {'>=' if t['at_least'] else '<='} {t['want']}: {t['got']:.3g} "
            f"{'met' if t['met'] else 'missed'}")
    return result

"""Time to quality: validation bits per byte against training time, four recipes side by side.

    python -m bench quality                         # budgets of 1, 2 and 3 minutes, 3 seeds: ~50 minutes
    python -m bench quality --budgets 2,5,10        # the issue's budgets (about 2.5 hours on 2 cores)
    python -m bench quality --corpus wikitext       # WikiText-2 from ../shared/data (the bench only)

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
"""
from __future__ import annotations

import math
import shutil
import statistics
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from bench.common import StepClock, load_average, load_text, machine, part, summary
from bench.curves import BudgetReached, Run, Validation, Watch, WatchRecorder
from bench.quality_figures import comparisons, contender_rows, loss_memory
from bench.hf_trainer import run_hf_defaults
from bench.interleave import run_interleaved
from bench.plain_loop import run_plain
from trainer.config import TrainConfig
from trainer.data import PreparedData, prepare_data
from trainer.flops import Peak, flops_per_token, probe_peak_flops
from trainer.model import count_parameters

PLAIN = "(a) plain loop"
HF = "(b) HF Trainer, its defaults"
TODAY = "(c) trainer, today's defaults"
NEW = "(d) trainer, new recipe"
NO_EVAL = 10 ** 9            # the loops' own eval_every: the bench evaluates every model itself
WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"


@dataclass(frozen=True)
class Sizes:
    subset: float = 1.0          # the whole offline corpus (~3M tokens): the default budgets see each block once
    vocab_size: int = 4096
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    block_size: int = 128
    micro_batch: int = 16        # 2,048 tokens per optimizer step, for every contender
    eval_every: int = 50         # optimizer steps between evaluations, the same for all
    eval_batches: int = 10       # validation micro-batches per evaluation: 160 blocks of 128 tokens
    calibration_warmup: int = 3  # steps before the timed calibration steps
    calibration_steps: int = 15  # their median time sets each contender's schedule (planned_steps)
    budgets_min: tuple[float, ...] = (1.0, 2.0, 3.0)

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch * self.block_size

    def config(self, cache_dir: str, corpus: str) -> TrainConfig:
        """The shared config: TrainConfig's defaults (today's recipe), these sizes, fp32 on the CPU."""
        sizes = {k: getattr(self, k) for k in ("subset", "vocab_size", "n_layer", "n_embd", "n_head",
                                               "block_size", "micro_batch", "eval_batches")}
        source = {"dataset": str(wikitext_dir(cache_dir))} if corpus == "wikitext" else {}
        return TrainConfig.from_dict({**sizes, **source, "device": "cpu", "precision": "fp32", "progress": False,
                                      "eval_every": NO_EVAL, "save_every": 0, "epochs": 10_000,
                                      "cache_dir": cache_dir}).check()


FULL = Sizes()
SMOKE = Sizes(subset=0.03, vocab_size=512, n_layer=1, n_embd=32, n_head=2, block_size=32, micro_batch=8,
              eval_every=20, eval_batches=2, calibration_warmup=1, calibration_steps=3, budgets_min=(0.02, 0.04))


def wikitext_dir(cache_dir: str) -> Path:
    """WikiText-2 as a local dataset directory: valid.txt trains, test.txt is the held-out split
    (../shared/data/README.md's suggestion); links, so nothing is copied."""
    if not (WIKITEXT / "valid.txt").is_file():
        raise FileNotFoundError(f"--corpus wikitext: {WIKITEXT} holds no valid.txt; use --corpus offline")
    folder = Path(cache_dir) / "wikitext-2"
    folder.mkdir(parents=True, exist_ok=True)
    for name, source in (("train.txt", "valid.txt"), ("validation.txt", "test.txt")):
        if not (folder / name).exists():
            (folder / name).symlink_to(WIKITEXT / source)
    return folder


# -- the contenders ----------------------------------------------------------------------
def run_ours(cfg: TrainConfig, data: PreparedData, out_dir: Path, watch: Watch) -> None:
    """The trainer's own loop (trainer.loop.Trainer.run_steps), set up as trainer.run.train sets it
    up; the run's row, final checkpoint and export, which follow the steps, are left out."""
    from trainer.checkpoints import plan_resume
    from trainer.clock import StopClock
    from trainer.device import place
    from trainer.interrupts import StopRequests
    from trainer.loop import Trainer

    cfg = cfg.replace(out_dir=str(out_dir))
    loop = Trainer(cfg, data, place(cfg), WatchRecorder(watch), StopRequests(), StopClock.for_limits("", ""),
                   log=lambda *_: None)
    loop.restore(plan_resume(cfg))
    watch.watch(loop.model)
    try:
        loop.run_steps()
    finally:
        if loop.store:
            loop.store.drain()      # an epoch end's checkpoint in flight, before its folder goes


def run_plain_fp32(cfg: TrainConfig, data: PreparedData, out_dir: Path, watch: Watch) -> None:
    run_plain(cfg, data, "fp32", out_dir, watch, on_model=watch.watch)


def run_hf(cfg: TrainConfig, data: PreparedData, out_dir: Path, watch: Watch) -> None:
    run_hf_defaults(cfg, data, out_dir, watch, watch.watch)


Loop = Callable[[TrainConfig, PreparedData, Path, Watch], None]
Specs = dict[str, tuple[Loop, dict[str, Any]]]       # each contender's loop, and its settings over the shared config


def contenders(recipe_arch: str) -> Specs:
    """Each contender's loop and its settings over the shared config (TrainConfig's defaults)."""
    return {PLAIN: (run_plain_fp32, {}), HF: (run_hf, {}), TODAY: (run_ours, {}),
            NEW: (run_ours, {"optimizer": "muon", "arch": recipe_arch})}


def interleaved(specs: Specs, order: list[str], cfg: TrainConfig,
                data: PreparedData, steps: dict[str, int], watch: Callable[[StepClock, int], Watch]
                ) -> dict[str, Watch]:
    """Every contender of ``order`` for at most its ``steps``, interleaved step by step, each in a
    fresh folder; the watch of each."""
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
        run_interleaved({n: loop(n, work / f"c{i}") for i, n in enumerate(order)})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return watches


def planned_steps(specs: Specs, order: list[str], cfg: TrainConfig, data: PreparedData,
                  sizes: Sizes) -> dict[str, int]:
    """Each contender's steps in the largest budget: the budget over its median step time in a few
    interleaved steps after a warm-up (the median: a step that a burst of load slowed does not count).
    The length of its learning-rate schedule, and its step limit."""
    first, last = sizes.calibration_warmup, sizes.calibration_warmup + sizes.calibration_steps
    watches = interleaved(specs, order, cfg, data, {n: last for n in order},
                          lambda clock, steps: Watch(clock, None, [math.inf], NO_EVAL, steps))
    budget_s = 60 * max(sizes.budgets_min)
    step_s = {n: statistics.median(w.clock.stamps[i] - w.clock.stamps[i - 1] for i in range(first + 1, last + 1))
              for n, w in watches.items()}
    return {n: max(1, int(budget_s / s)) for n, s in step_s.items()}


# -- one seed ------------------------------------------------------------------------------
def one_seed(specs: Specs, order: list[str], cfg: TrainConfig, data: PreparedData, validation: Validation,
             sizes: Sizes) -> dict[str, Run]:
    steps = planned_steps(specs, order, cfg, data, sizes)
    budgets_s = [60 * b for b in sizes.budgets_min]
    watches = interleaved(specs, order, cfg, data, steps,
                          lambda clock, last: Watch(clock, validation, budgets_s, sizes.eval_every, last))
    return {n: Run(w.points, steps[n], count_parameters(w.model), flops_per_token(w.model, sizes.block_size),
                   sizes.tokens_per_step) for n, w in watches.items()}


def all_seeds(specs: Specs, cfg: TrainConfig, data: PreparedData, validation: Validation, sizes: Sizes, repeats: int,
              log: Callable[[str], None]) -> tuple[dict[str, list[Run]], list[dict[str, list[float]]]]:
    """Every contender once per seed; the order rotates (a b c d, b c d a, ...) so none always
    follows the same one. The load average before and after each seed."""
    names = list(specs)
    runs: dict[str, list[Run]] = {n: [] for n in names}
    loads = []
    for s in range(repeats):
        order = names[s % len(names):] + names[:s % len(names)]
        before = load_average()
        for name, one in one_seed(specs, order, cfg.replace(seed=cfg.seed + s), data, validation, sizes).items():
            runs[name].append(one)
        loads.append({"before": before, "after": load_average()})
        log(f"  seed {s + 1}/{repeats} ({load_text()}): " + ", ".join(
            f"{n} {r[-1].points[-1].bpb:.3f} bpb after {r[-1].points[-1].seconds:.0f} s" for n, r in runs.items()))
    return runs, loads


def settings(sizes: Sizes, data: PreparedData, validation: Validation, peak: Peak, recipe_arch: str,
             repeats: int) -> dict[str, Any]:
    native_bf16 = machine().get("cpu_bf16")
    return {**asdict(sizes), "corpus": data.dataset_identity["source"], "train_tokens": len(data.train),
            "vocab": data.vocab_size, "eval_tokens": validation.tokens, "eval_bytes": validation.bytes,
            "seeds": repeats, "threads": torch.get_num_threads(), "new_recipe_arch": recipe_arch,
            "precision": "fp32 (the CPU has native bf16)" if native_bf16 else "fp32: this CPU has no native bf16",
            "fp32_peak": f"{peak.flops / 1e9:.1f} GFLOP/s ({peak.how})"}


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
            "just before each seed: the same rule for all",
            "bf16 is not compared: this CPU runs bf16 many times slower than fp32, so every contender runs in the "
            "precision the machine runs natively"]


def report(runs: dict[str, list[Run]], loads: list[dict], sizes: Sizes, data: PreparedData,
           validation: Validation, peak: Peak, recipe_arch: str, repeats: int, smoke: bool) -> dict[str, Any]:
    largest_s = 60 * max(sizes.budgets_min)
    finals = [r.bpb_at(largest_s) for r in runs[PLAIN]]      # (a)'s final bpb, per seed: the bar to reach
    rows, grid = [], {}
    for name, rs in runs.items():
        mine, grid[name] = contender_rows(name, rs, finals, sizes.budgets_min, peak)
        rows += mine
    ratios, targets, headline = comparisons(runs, PLAIN, NEW, finals, largest_s)
    memory_rows, memory_targets, memory_notes = loss_memory(smoke)
    return part(
        "Time to quality", settings=settings(sizes, data, validation, peak, recipe_arch, repeats),
        method=("per seed, the four contenders run interleaved, one optimizer step each in turn (the order rotates "
                "from seed to seed), each from the same seed on the same token stream; a contender's training time "
                "is the time it held the turn from the end of its first step, evaluations excluded; every model is "
                "scored by one shared evaluation of the trainer's fixed validation blocks (bits per byte of their "
                "text). Ratios: median over seeds of the per-seed ratio"),
        rows=rows + memory_rows, ratios=ratios, targets=targets + memory_targets,
        notes=notes(sizes, recipe_arch) + memory_notes, repeats=repeats, smoke=smoke,
        extra={"load_average": {"per_round": [x["after"] for x in loads], "before_after": loads},
               "grid": {"budgets_min": list(sizes.budgets_min), "target_bpb": summary(finals), "contenders": grid},
               "headline": headline,
               "curves": {n: [[[p.seconds, p.step, p.bpb] for p in r.points] for r in rs] for n, rs in runs.items()}})


def run(repeats: int, smoke: bool, cache_dir: str, budgets: tuple[float, ...] | None = None,
        corpus: str = "offline", recipe_arch: str = "llama", log: Callable[[str], None] = print) -> dict[str, Any]:
    sizes = SMOKE if smoke else FULL
    if budgets:
        sizes = Sizes(**{**asdict(sizes), "budgets_min": tuple(sorted(budgets))})
    cfg = sizes.config(cache_dir, corpus)
    data = prepare_data(cfg, log=lambda *_: None)
    validation = Validation(data, sizes.block_size, sizes.micro_batch, sizes.eval_batches)
    specs = contenders(recipe_arch)
    # Probed now rather than read from the machine's cache: a peak cached under another load would
    # misstate this run's MFU (trainer.flops caches the first probe for good).
    peak = probe_peak_flops(torch.device("cpu"), torch.float32)
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

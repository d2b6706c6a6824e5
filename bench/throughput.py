"""Training throughput: this trainer against a plain nanoGPT-style loop and the HF Trainer.

Same GPT-2 model (built by ``trainer.model.build_model``, same seed), same token stream
(``prepare_data`` once, handed to all three), same micro-batch, schedule, evaluation and
checkpoint cadence. Each contender runs ``warmup + steps`` optimizer steps in a fresh
directory; throughput is taken between the timestamp at the end of step ``warmup`` and at
the end of the last step, so set-up, the first steps and the final save are left out while
everything the loop does per step (logging, evaluation, checkpoints) is counted.

MFU of each contender: its tokens/s x FLOPs per token (``trainer.flops.flops_per_token``: 6 N +
12 L H T) over this machine's measured matmul peak in the dtype the contender computes in
(``trainer.flops.measured_peak``: probed once per machine and cached), on the CPU as on a GPU.
"""
from __future__ import annotations

import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch

from bench import breakdown, steps
from bench.common import StepClock, load_average, load_text, part, ratio, row, summary, target
from bench.hf_trainer import run_hf
from bench.interleave import run_interleaved
from bench.plain_loop import run_plain
from trainer.config import TrainConfig
from trainer.data import PreparedData, prepare_data
from trainer.device import place
from trainer.flops import Peak, flops_per_token, measured_peak
from trainer.recorder import NullRecorder

TARGET_VS_PLAIN = 0.99
TARGET_VS_HF = 1.0
BREAKDOWN_ITERATIONS = 20
OURS = "trainer fp32"
OURS_NO_DB = "trainer fp32, no database"
PLAIN = "plain loop fp32"
PLAIN_BF16 = "plain loop bf16"
HF = "HF Trainer fp32"
HF_BF16 = "HF Trainer bf16"


@dataclass(frozen=True)
class Sizes:
    subset: float = 0.3          # of the standard library's sources: ~7,000 blocks of 128 tokens
    vocab_size: int = 4096
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    block_size: int = 128
    micro_batch: int = 16
    grad_accum: int = 1
    device: str = "cpu"
    warmup: int = 3              # optimizer steps before the timed window
    steps: int = 30              # optimizer steps timed
    eval_every: int = 15         # 2 evaluations and 2 checkpoints inside the timed window
    eval_batches: int = 8
    save_every: int = 15

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch * self.grad_accum * self.block_size

    def config(self, cache_dir: str, base: dict[str, Any] | None = None) -> TrainConfig:
        """The run's config: ``base`` settings (a preset), then these sizes over them."""
        sizes = {k: v for k, v in asdict(self).items() if k not in ("warmup", "steps")}
        return TrainConfig.from_dict({**(base or {"warmup_steps": 10}), **sizes,
                                      "max_steps": self.warmup + self.steps, "progress": False,
                                      "cache_dir": cache_dir}).check()


FULL = Sizes()
SMOKE = Sizes(subset=0.03, vocab_size=512, n_layer=1, n_embd=32, n_head=2, block_size=32, micro_batch=8,
              warmup=2, steps=4, eval_every=2, eval_batches=2, save_every=4)


class ClockRecorder:
    """Stamps the clock when the trainer reports a step, then passes everything on, timing
    every call it passes on: ``clock.costs`` gets the seconds spent in ``log_step`` and in
    the other recorder calls (the training thread's share of recording)."""

    def __init__(self, inner: Any, clock: StepClock):
        self.inner, self.clock = inner, clock
        clock.costs.update({"log_step_s": 0.0, "log_step_calls": 0, "other_calls_s": 0.0})

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        self.clock.stamp(step)
        start = time.perf_counter()
        self.inner.log_step(step, metrics)
        self.clock.costs["log_step_s"] += time.perf_counter() - start
        self.clock.costs["log_step_calls"] += 1

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.inner, name)
        if not callable(method):
            return method

        def timed_call(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.clock.costs["other_calls_s"] += time.perf_counter() - start
        return timed_call


def run_ours(cfg: TrainConfig, data: PreparedData, precision: str, out_dir: Path, clock: StepClock,
             database: bool = True) -> None:
    """``trainer.run.train`` as users run it: per-step records into a real expdb database."""
    import expdb
    from trainer.run import train

    db = expdb.open(out_dir / "experiments.db") if database else None
    try:
        recorder = db.recorder() if db else NullRecorder()
        train(cfg.replace(precision=precision, out_dir=str(out_dir / "run")), ClockRecorder(recorder, clock),
              data=data, log=lambda *_: None)
        clock.costs["writer_cpu_s"] = getattr(recorder, "writer_cpu_s", 0.0)
    finally:
        if db:
            db.close()


@dataclass(frozen=True)
class Contender:
    loop: Callable
    precision: str
    database: bool = True
    compile: bool = False      # the trainer's --compile

    def bind(self, cfg: TrainConfig, data: PreparedData, out_dir: Path) -> Callable[[StepClock], None]:
        kw = {"database": self.database} if self.loop is run_ours else {}
        cfg = cfg.replace(compile=True) if self.compile else cfg
        return lambda clock: self.loop(cfg, data, self.precision, out_dir, clock, **kw)


def contenders(cfg: TrainConfig) -> dict[str, Contender]:
    auto = place(cfg.replace(precision="auto")).precision     # what "auto" means on this machine
    return {
        OURS: Contender(run_ours, "fp32"),
        PLAIN: Contender(run_plain, "fp32"),
        HF: Contender(run_hf, "fp32"),
        OURS_NO_DB: Contender(run_ours, "fp32", database=False),
        f"trainer auto ({auto})": Contender(run_ours, "auto"),
        PLAIN_BF16: Contender(run_plain, "bf16"),
        HF_BF16: Contender(run_hf, "bf16"),
    }


class MfuFigures(NamedTuple):
    """MFU rows of the contenders and the peaks they were measured against (one per dtype)."""
    rows: list[dict[str, Any]]
    peaks: list[dict[str, Any]]


def compute_dtype(cfg: TrainConfig, precision: str) -> torch.dtype:
    """The dtype a contender's matmuls run in: its autocast dtype, else fp32 (``place`` resolves "auto")."""
    return place(cfg.replace(precision=precision)).autocast_dtype or torch.float32


def peak_record(peak: Peak, dtype: torch.dtype, vendor_flops: float | None = None) -> dict[str, Any]:
    """A peak as the results JSON keeps it (rendered by bench.report.peak_notes)."""
    return {"dtype": str(dtype).removeprefix("torch."), **peak._asdict(), "vendor_flops": vendor_flops}


def mfu_figures(specs: dict[str, Contender], cfg: TrainConfig, data: PreparedData,
                tokens_per_s: dict[str, list[float]], vendor: Callable[[torch.dtype], float | None] = lambda _: None
                ) -> MfuFigures:
    """Each contender's MFU (%) per round against the measured peak of its dtype; ``vendor`` gives
    the datasheet peak of a dtype, reported beside the measured one as a cross-check."""
    from trainer.model import build_model

    per_token = flops_per_token(build_model(cfg, data.vocab_size, data.tokenizer.eos_token_id), cfg.block_size)
    dtypes = {name: compute_dtype(cfg, spec.precision) for name, spec in specs.items()}
    device = place(cfg).device
    peaks = {dtype: measured_peak(device, dtype) for dtype in dict.fromkeys(dtypes.values())}
    rows = [row(f"MFU {name}", [100 * v * per_token / peaks[dtypes[name]].flops for v in values], "%")
            for name, values in tokens_per_s.items() if peaks[dtypes[name]]]
    records = [peak_record(peak, dtype, vendor(dtype)) for dtype, peak in peaks.items() if peak]
    return MfuFigures(rows, records)


def one_round(specs: dict[str, Contender], cfg: TrainConfig, data: PreparedData, sizes: Sizes,
              rotate: int, main: str = OURS) -> dict[str, StepClock]:
    """All contenders interleaved step by step, each in a fresh directory; the clock of each."""
    # A new cyclic order every round: each contender follows a different one each time, so none
    # always runs just after the same neighbour (and whatever that one leaves running).
    names = list(specs)
    random.Random(rotate).shuffle(names)
    work = Path(tempfile.mkdtemp(prefix="bench-tput-"))
    try:
        loops = {n: specs[n].bind(cfg, data, work / f"c{i}") for i, n in enumerate(names)}
        for i in range(len(names)):
            (work / f"c{i}").mkdir()
        sync = torch.cuda.synchronize if sizes.device == "cuda" else None
        return run_interleaved(loops, main=main, sync=sync)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@dataclass
class Rounds:
    """Every round's tokens/s and step durations, per contender."""

    sizes: Sizes
    tokens_per_s: dict[str, list[float]]
    steps: dict[str, list[dict[int, float]]]
    costs: dict[str, list[dict[str, float]]]
    spans: dict[str, list[float]]       # seconds each held the turn up to its last step
    loads: list[list[float]]            # the machine's load averages after each round

    @classmethod
    def measure(cls, specs: dict[str, Contender], cfg: TrainConfig, data: PreparedData, sizes: Sizes,
                repeats: int, log: Callable[[str], None], main: str = OURS) -> "Rounds":
        first, last = sizes.warmup, sizes.warmup + sizes.steps
        out = cls(sizes, *({n: [] for n in specs} for _ in range(4)), loads=[])
        for r in range(repeats):
            for name, clock in one_round(specs, cfg, data, sizes, r, main).items():
                out.tokens_per_s[name].append(clock.tokens_per_s(first, last, sizes.tokens_per_step))
                out.steps[name].append(steps.durations(clock, first, last))
                out.costs[name].append(dict(clock.costs))
                out.spans[name].append(clock.stamps[last])
            out.loads.append(load_average())
            log(f"  round {r + 1}/{repeats} ({load_text()}): "
                + ", ".join(f"{n} {v[-1]:,.0f}" for n, v in out.tokens_per_s.items()))
        return out

    @property
    def busy(self) -> set[int]:
        s = self.sizes
        return steps.busy_steps(s.warmup, s.warmup + s.steps, s.eval_every, s.save_every)

    def step_rows(self) -> list[dict[str, Any]]:
        rows = []
        for name, rounds in self.steps.items():
            rows += [row(f"{name}: plain step (no evaluation or checkpoint)", steps.plain_step_ms(rounds, self.busy),
                         "ms", higher_is_better=False),
                     row(f"{name}: evaluation + checkpoint, extra time", steps.extra_ms(rounds, self.busy), "ms",
                         higher_is_better=False)]
        return rows

    def logging_rows(self, name: str) -> list[dict[str, Any]]:
        """What recording costs ``name`` (a trainer run on a database), from the timed calls and
        the writer thread's CPU time, against the same run's own step time: too small a share to
        show through the noise of an end-to-end ratio, so measured directly."""
        per_step_us, step_share, all_share = [], [], []
        plain_ms = steps.plain_step_ms(self.steps[name], self.busy)
        for costs, span, step_ms in zip(self.costs[name], self.spans[name], plain_ms):
            per_step = (costs["log_step_s"] + costs["writer_cpu_s"]) / costs["log_step_calls"]
            per_step_us.append(1e6 * per_step)
            step_share.append(100 * per_step / (step_ms / 1e3))
            everything = costs["log_step_s"] + costs["other_calls_s"] + costs["writer_cpu_s"]
            all_share.append(100 * everything / span)
        return [
            row(f"{name}: per-step logging, time per step (log_step call + writer thread CPU)", per_step_us,
                "µs", higher_is_better=False),
            row(f"{name}: per-step logging, share of a plain step", step_share, "%", higher_is_better=False),
            row(f"{name}: all recording, share of the run", all_share, "%", higher_is_better=False,
                note="start_run, every step, evaluation, epoch, checkpoint and finish call on the training "
                     "thread (flush waits included) plus the writer thread's CPU, over the run's time to its "
                     "last step"),
        ]

    def step_ratio(self, a: str, b: str) -> dict[str, Any]:
        values = steps.paired_ratio(self.steps[a], self.steps[b], self.busy)
        return {"name": f"plain steps, paired: {a} / {b}", "note": "speed; median over steps of each round",
                **summary(values)}


def run(repeats: int, smoke: bool, cache_dir: str, log: Callable[[str], None] = print) -> dict[str, Any]:
    sizes = SMOKE if smoke else FULL
    cfg = sizes.config(cache_dir)
    data = prepare_data(cfg, log=lambda *_: None)
    specs = contenders(cfg)
    log(f"throughput: {len(data.train):,} training tokens, vocab {data.vocab_size}, {len(specs)} contenders "
        f"interleaved step by step, {sizes.warmup}+{sizes.steps} steps each, {repeats} rounds ({load_text()})")
    rounds = Rounds.measure(specs, cfg, data, sizes, repeats, log)
    pieces = breakdown.measure(cfg, data.vocab_size, BREAKDOWN_ITERATIONS if not smoke else 2)
    mfu = mfu_figures(specs, cfg, data, rounds.tokens_per_s)
    result = report(rounds, pieces, data, repeats, smoke, mfu)
    for r in result["ratios"][:8]:
        log(f"  {r['name']}: {r['median']:.3f} ({r['min']:.3f} - {r['max']:.3f})")
    for t in result["targets"]:
        log(f"  target {t['name']} {'>=' if t['at_least'] else '<='} {t['want']}: {t['got']:.3f} "
            f"{'met' if t['met'] else 'missed'} ({load_text()})")
    return result


def report(rounds: Rounds, pieces: dict[str, list[float]], data: PreparedData, repeats: int,
           smoke: bool, mfu: MfuFigures) -> dict[str, Any]:
    r, sizes = rounds.tokens_per_s, rounds.sizes
    auto = next(n for n in r if n.startswith("trainer auto"))
    ratios = [
        ratio(f"{OURS} / {PLAIN}", r[OURS], r[PLAIN]),
        ratio(f"{HF} / {PLAIN}", r[HF], r[PLAIN]),
        ratio(f"{OURS} / {HF}", r[OURS], r[HF]),
        ratio(f"{OURS} / {OURS_NO_DB}", r[OURS], r[OURS_NO_DB], note="the cost of per-step database logging"),
        ratio(f"{auto} / {PLAIN}", r[auto], r[PLAIN], note="the default precision against fp32"),
        ratio(f"{PLAIN_BF16} / {PLAIN}", r[PLAIN_BF16], r[PLAIN]),
        ratio(f"{auto} / {PLAIN_BF16}", r[auto], r[PLAIN_BF16]),
        ratio(f"{auto} / {HF_BF16}", r[auto], r[HF_BF16]),
    ]
    recording = rounds.logging_rows(OURS)
    logging_share = next(x for x in recording if "share of a plain step" in x["name"])
    targets = [target(ratios[0]["name"], ratios[0]["median"], TARGET_VS_PLAIN),
               target(ratios[2]["name"], ratios[2]["median"], TARGET_VS_HF),
               target(ratios[6]["name"], ratios[6]["median"], TARGET_VS_PLAIN),
               target(ratios[7]["name"], ratios[7]["median"], TARGET_VS_HF),
               target("per-step logging, share of a plain step", logging_share["median"], 1.0, at_least=False,
                      unit="%")]
    ratios += [rounds.step_ratio(OURS, PLAIN), rounds.step_ratio(HF, PLAIN), rounds.step_ratio(OURS, HF),
               rounds.step_ratio(OURS, OURS_NO_DB),
               ratio("step piece: AdamW fused / foreach", pieces[breakdown.FUSED], pieces[breakdown.FOREACH])]
    notes = [breakdown.fused_note(pieces),
             f"per-step logging: interleaved, each contender's steps are {len(rounds.steps) - 1} other steps "
             "apart, longer than the writer's 0.5 s interval, so the writer commits once per step here and "
             "the fixed CPU cost of a transaction lands on every step; a run on its own commits at most "
             "every 0.5 s, so the writer's share of a core is bounded by that cost per 0.5 s whatever the "
             "step rate"]
    if any("(emulated)" in peak["how"] for peak in mfu.peaks):
        notes.append("MFU in an emulated 16-bit dtype (no AVX512-BF16 or AMX on this CPU): the probe's square "
                     "products are no ceiling for the model's matmuls of other shapes, so it can pass 100%")
    return part(
        "Training throughput",
        settings={**asdict(sizes), "vocab": data.vocab_size, "train_tokens": len(data.train),
                  "corpus": data.dataset_identity["source"]},
        method=("all contenders run in one process, interleaved one optimizer step each in turn (each "
                "in its own thread; only the one holding the turn computes; a new cyclic order every "
                "round), so all see the same load; "
                "tokens/s from the time each held the turn between the end of step `warmup` and the end "
                "of step `warmup + steps`, evaluations and checkpoints included, set-up and the final "
                "save excluded. Ratios: median over rounds of the per-round ratio"),
        rows=[row(name, values, "tokens/s") for name, values in r.items()] + rounds.step_rows()
        + recording + mfu.rows
        + [row(f"step piece: {name}", values, "ms", higher_is_better=False) for name, values in pieces.items()],
        ratios=ratios, targets=targets, notes=notes, repeats=repeats, smoke=smoke,
        extra={"load_average": {"per_round": rounds.loads}, "peaks": mfu.peaks})

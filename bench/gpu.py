"""Throughput on a CUDA GPU: the kaggle-t4 preset's model and batch, with model FLOPs utilisation.

The same interleaved comparison as ``bench.throughput`` (trainer, plain loop, HF Trainer), in
the precision "auto" resolves to on that GPU (fp16 with a scaler on a T4, bf16 on Ampere and
newer) for all three. The data is the offline standard-library corpus with a byte-level BPE
(WikiText-103 and the GPT-2 tokenizer would need the network). Without a GPU the part records
that it was not measured.

MFU = tokens/s x FLOPs per token / the GPU's measured matmul peak in the run's dtype, both from
trainer.flops as the trainer's own epoch metric: FLOPs per token as nanoGPT's ``estimate_mfu``
(6 N + 12 L H T, N parameters without position embeddings), the peak probed once per machine and
cached. The vendor's datasheet peak is reported beside the measured one, with the trainer's MFU
against it, as a cross-check. The trainer also runs with --compile (torch.compile), against its
eager self; compiling happens in the warm-up steps.
"""
from __future__ import annotations

from dataclasses import asdict, replace
from typing import Any, Callable

import torch

from bench.common import part, ratio, row
from bench.hf_trainer import run_hf
from bench.plain_loop import run_plain
from bench.throughput import Contender, MfuFigures, Rounds, Sizes, mfu_figures, run_ours
from trainer.data import prepare_data
from trainer.device import place
from trainer.flops import peak_flops
from trainer.presets import PRESETS

NOT_MEASURED = "not measured: no CUDA GPU on this machine"
OURS, OURS_COMPILED, PLAIN, HF = "trainer", "trainer --compile", "plain loop", "HF Trainer"

_T4 = PRESETS["kaggle-t4"]
# A third of the standard library (~2 M tokens): the 32,000-token BPE trains in seconds, so the part
# fits .ci/gpu-check's 3 minutes; throughput does not depend on how much text there is.
FULL = Sizes(subset=0.3, vocab_size=32000, n_layer=_T4["n_layer"], n_embd=_T4["n_embd"], n_head=_T4["n_head"],
             block_size=_T4["block_size"], micro_batch=_T4["micro_batch"], grad_accum=_T4["grad_accum"],
             device="cuda", warmup=3, steps=30, eval_every=15, eval_batches=20, save_every=15)
SMOKE = replace(FULL, subset=0.03, vocab_size=512, n_layer=1, n_embd=32, n_head=2, block_size=32, micro_batch=4,
                grad_accum=2, warmup=2, steps=4, eval_every=2, eval_batches=2, save_every=4)


def run(repeats: int, smoke: bool, cache_dir: str, log: Callable[[str], None] = print,
        device: str | None = None) -> dict[str, Any]:
    """``device`` overrides the check (``"cpu"`` exercises this code without a GPU)."""
    device = device or ("cuda" if torch.cuda.is_available() else None)
    if device is None:
        return part("GPU throughput (kaggle-t4)", settings={}, method="", rows=[], notes=[NOT_MEASURED],
                    repeats=0, smoke=smoke, extra={"measured": False})
    sizes = replace(SMOKE if smoke else FULL, device=device)
    base = {k: v for k, v in _T4.items() if k not in ("dataset", "dataset_config", "tokenizer")}
    cfg = sizes.config(cache_dir, base)
    data = prepare_data(cfg, log=lambda *_: None)
    precision = place(cfg.replace(precision="auto")).precision
    specs = {OURS: Contender(run_ours, "auto"), OURS_COMPILED: Contender(run_ours, "auto", compile=True),
             PLAIN: Contender(run_plain, precision), HF: Contender(run_hf, precision)}
    rounds = Rounds.measure(specs, cfg, data, sizes, repeats, log, main=OURS)
    results = rounds.tokens_per_s
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    rows = [row(f"{n} {precision}", v, "tokens/s") for n, v in results.items()] + rounds.step_rows()
    mfu = mfu_figures(specs, cfg, data, results, vendor=lambda dtype: vendor_peak(name, dtype))
    rows += mfu.rows + vendor_rows(mfu)
    return part(
        "GPU throughput (kaggle-t4)", settings={**asdict(sizes), "gpu": name, "precision": precision,
                                                 "vocab": data.vocab_size},
        method="as the CPU throughput part: interleaved step by step, CUDA synchronised at every stamp",
        rows=rows,
        ratios=[ratio(f"{OURS} / {PLAIN}", results[OURS], results[PLAIN]),
                ratio(f"{HF} / {PLAIN}", results[HF], results[PLAIN]),
                ratio(f"{OURS} / {HF}", results[OURS], results[HF]),
                ratio(f"{OURS_COMPILED} / {OURS}", results[OURS_COMPILED], results[OURS],
                      note="torch.compile against eager, the same steps"),
                rounds.step_ratio(OURS, PLAIN), rounds.step_ratio(OURS, HF)],
        repeats=repeats, smoke=smoke, extra={"measured": True, "peaks": mfu.peaks})


def vendor_peak(gpu_name: str, dtype: torch.dtype) -> float | None:
    """The datasheet peak, which is the 16-bit dense figure: no cross-check for an fp32 run."""
    return peak_flops(gpu_name) if dtype in (torch.float16, torch.bfloat16) else None


def vendor_rows(mfu: MfuFigures) -> list[dict[str, Any]]:
    """The trainer's MFU against the vendor's peak instead of the measured one, as papers quote it.
    Every contender computes in the one dtype "auto" resolves to: one peak."""
    ours = [r for r in mfu.rows if r["name"] == f"MFU {OURS}"]
    if len(mfu.peaks) != 1 or not mfu.peaks[0]["vendor_flops"] or not ours:
        return []
    scale = mfu.peaks[0]["flops"] / mfu.peaks[0]["vendor_flops"]
    return [row(f"MFU {OURS}, against the vendor's peak", [v * scale for v in ours[0]["values"]], "%")]

"""Throughput on a CUDA GPU: the kaggle-t4 preset's model and batch, with model FLOPs utilisation.

The same interleaved comparison as ``bench.throughput`` (trainer, plain loop, HF Trainer), in
the precision "auto" resolves to on that GPU (fp16 with a scaler on a T4, bf16 on Ampere and
newer) for all three. The data is the offline standard-library corpus with a byte-level BPE
(WikiText-103 and the GPT-2 tokenizer would need the network). Without a GPU the part records
that it was not measured.

MFU = tokens/s x FLOPs per token / the GPU's peak dense tensor FLOPS (trainer.flops), FLOPs per
token as in nanoGPT's ``estimate_mfu``: 6 N + 12 L H Q T (N parameters without position
embeddings); the trainer's own epoch metric uses the plain 6 N. The trainer also runs with
--compile (torch.compile), against its eager self; compiling happens in the warm-up steps.
"""
from __future__ import annotations

from dataclasses import asdict, replace
from typing import Any, Callable

from bench.common import part, ratio, row
from bench.hf_trainer import run_hf
from bench.plain_loop import run_plain
from bench.throughput import Contender, Rounds, Sizes, run_ours
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


def flops_per_token(n_params: int, sizes: Sizes) -> float:
    non_embedding = n_params - sizes.block_size * sizes.n_embd          # position embeddings
    head_dim = sizes.n_embd // sizes.n_head
    return 6 * non_embedding + 12 * sizes.n_layer * sizes.n_head * head_dim * sizes.block_size


def run(repeats: int, smoke: bool, cache_dir: str, log: Callable[[str], None] = print,
        device: str | None = None) -> dict[str, Any]:
    """``device`` overrides the check (``"cpu"`` exercises this code without a GPU)."""
    import torch

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
    peak = peak_flops(name)
    if peak:
        from trainer.model import build_model
        n_params = sum(p.numel() for p in build_model(cfg, data.vocab_size, data.tokenizer.eos_token_id).parameters())
        fpt = flops_per_token(n_params, sizes)
        rows += [row(f"MFU {n}", [100 * v * fpt / peak for v in vals], "%") for n, vals in results.items()]
    return part(
        "GPU throughput (kaggle-t4)", settings={**asdict(sizes), "gpu": name, "precision": precision,
                                                 "peak_flops": peak, "vocab": data.vocab_size},
        method="as the CPU throughput part: interleaved step by step, CUDA synchronised at every stamp",
        rows=rows,
        ratios=[ratio(f"{OURS} / {PLAIN}", results[OURS], results[PLAIN]),
                ratio(f"{HF} / {PLAIN}", results[HF], results[PLAIN]),
                ratio(f"{OURS} / {HF}", results[OURS], results[HF]),
                ratio(f"{OURS_COMPILED} / {OURS}", results[OURS_COMPILED], results[OURS],
                      note="torch.compile against eager, the same steps"),
                rounds.step_ratio(OURS, PLAIN), rounds.step_ratio(OURS, HF)],
        repeats=repeats, smoke=smoke, extra={"measured": True})

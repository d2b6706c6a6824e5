"""Model FLOPs utilisation (MFU): the share of the machine's peak arithmetic a run's tokens/s uses.

MFU = FLOPs per token x tokens/s / (peak FLOP/s x devices).

- FLOPs per token (``flops_per_token``), as nanoGPT's ``estimate_mfu`` and the PaLM paper's
  appendix B: 6 N for the forward and backward matmuls of the N parameters (learned position
  embeddings left out: a lookup, no arithmetic; tied input and output embeddings counted once,
  as the output layer), plus 12 x layers x width x block size for the attention scores and
  their weighted sum, which no parameter stands for.
- The peak (``measured_peak``) is measured, not looked up: a matrix-product probe in the dtype
  the run computes in (its autocast dtype, bf16 or fp16; else fp32, as TF32 where a GPU run
  allows it), best rate of a few timed repetitions (the sizes, and why: ``CPU_PROBE_SIZE``).
  The figure is what this machine's matmuls reach, so MFU exists on the CPU too, and a GPU's
  clocks, power cap and cuBLAS are in it. The vendors'
  datasheet peaks (``peak_flops``) stay as a cross-check the GPU benchmark reports beside it.
- The probe runs once per machine: its result is cached in memory and in a small JSON file
  (``cache_file``), keyed by the device and its name, the dtype, the torch version and the
  thread count. A corrupt or unwritable cache is measured again and never fails the run. The
  figure says the load it was measured under: a busy CPU's reads low (MFU too high); delete the
  file to measure again.

On a GPU the probe's matrices (up to 3 x 8192^2 numbers: 384 MiB at 16 bits) are allocated once,
at the first epoch end of the first run on a machine: that epoch's ``mem_gpu_peak_mb`` includes
them where the model's own peak is smaller (a tiny model). A GPU without room for them is
probed at half the size, down to 1024, else has no MFU for now (probed again at the next epoch).
"""
from __future__ import annotations

import json
import math
import os
import platform
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import torch

from trainer.device import cpu_has_native_bf16
from trainer.files import atomic_write_json

# Peak dense FLOPS in the 16-bit type each GPU trains in (vendor datasheets), by name fragment.
PEAK_FLOPS = {"T4": 65e12, "P100": 18.7e12, "V100": 125e12, "A10G": 70e12, "L4": 121e12,
              "A100": 312e12, "H100": 989e12, "H200": 989e12}

CACHE_ENV = "SMALLGPT_CACHE"        # the cache folder; tests point it at a temporary one
CACHE_NAME = "peak_flops.json"
# The probe's square size. A CPU: 1024 in fp32 (2.1 GFLOP a product: ~45 ms on this project's
# 2-core CPU; the probe's 5 products take 0.25 s, 0.5 s with the cores busy) and in native bf16.
# Smaller products measure the machine's load more than its arithmetic: on those 2 cores shared
# with other work, 256 x 256 fp32 ran anywhere from 1 to 85 GFLOP/s (a thread descheduled at each
# of the product's barriers), 1024 between 16 and 55. Emulated bf16 (no AVX512-BF16 or AMX) runs
# ~1 GFLOP/s, where 1024 would take 2.4 s a product: 256 there. A GPU: 8192 in 16 bits, large
# enough to keep its tensor cores busy (384 MiB; not yet run on a GPU), 4096 in fp32 (~17 ms a
# product on a T4); halved while it does not fit in memory.
CPU_PROBE_SIZE, CPU_EMULATED_PROBE_SIZE = 1024, 256
GPU_PROBE_SIZE, GPU_FP32_PROBE_SIZE, GPU_SMALLEST_PROBE_SIZE = 8192, 4096, 1024
PROBE_REPEAT_S = 0.01     # one timed repetition runs products for at least this long (GPU launches amortised)
PROBE_REPEATS = 3         # timed repetitions, after a warm-up product and one to size them; the best counts

_MEASURED: dict[str, Peak] = {}     # this process's peaks by key: a probe at most once per key
_MEASURING = threading.Lock()       # a study's trials in threads (--n-jobs) wait for one probe, not run two


class Peak(NamedTuple):
    """A machine's measured peak in one dtype, and how it was measured."""
    flops: float            # FLOP/s
    how: str                # e.g. "best of 3 timed 1024x1024 float32 matmuls on AMD EPYC, 2 threads"
    measured_at: str        # ISO date of the probe (older than this process when read from the cache)


def peak_flops(device_name: str) -> float | None:
    """The vendor's datasheet peak of a GPU by its name (16-bit dense), None if not in the table."""
    return next((v for k, v in PEAK_FLOPS.items() if k in device_name), None)


def flops_per_token(model: torch.nn.Module, block_size: int) -> float:
    """Training FLOPs per token of a causal LM from transformers (GPT-2, Llama): 6 N + 12 L H T."""
    token_embedding = model.get_input_embeddings()
    # Any other embedding table is a learned position embedding (GPT-2's wpe; Llama has none).
    positions = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) and m is not token_embedding
                 for p in m.parameters()}
    counted = sum(p.numel() for p in model.parameters() if id(p) not in positions)   # tied weights once
    config = model.config
    return 6 * counted + 12 * config.num_hidden_layers * config.hidden_size * block_size


def utilisation(flops_per_token: float, tokens_per_s: float, device: torch.device, devices: int = 1,
                dtype: torch.dtype | None = None) -> float | None:
    """MFU of a run on ``devices`` such devices computing in ``dtype`` (None: no autocast, fp32),
    against the measured peak; None when tokens/s is not finite or no peak could be measured."""
    if not math.isfinite(tokens_per_s):
        return None
    peak = measured_peak_flops(device, dtype or torch.float32)
    return flops_per_token * tokens_per_s / (peak * devices) if peak else None


def measured_peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """FLOP/s of ``device``'s matrix products in ``dtype``: measured once per machine, then cached."""
    peak = measured_peak(device, dtype)
    return peak.flops if peak else None


def measured_peak(device: torch.device, dtype: torch.dtype) -> Peak | None:
    """The peak with how it was measured: from memory, else the cache file, else a probe."""
    with _MEASURING:
        return _measured_peak(device, dtype)


def _measured_peak(device: torch.device, dtype: torch.dtype) -> Peak | None:
    key = machine_key(device, dtype)
    if key in _MEASURED:
        return _MEASURED[key]
    path = cache_file()
    cached = read_cache(path) if path else {}
    peak = cached.get(key)
    if peak is None:
        peak = probe_peak_flops(device, dtype)
        if peak is None:
            return None          # no size fitted in the GPU's memory: no MFU, and another try next time
        if path:
            write_cache(path, {**cached, key: peak})
    _MEASURED[key] = peak
    return peak


def probe_peak_flops(device: torch.device, dtype: torch.dtype) -> Peak | None:
    """Time square matmuls in ``dtype`` on ``device``: the best rate (None: no size fitted in memory)."""
    n = probe_size(device, dtype)
    while True:
        try:
            rate = _matmul_rate(n, device, dtype)
            break
        except torch.OutOfMemoryError:
            if n <= GPU_SMALLEST_PROBE_SIZE:
                return None
            n //= 2
    how = (f"best of {PROBE_REPEATS} timed {n}x{n} {_dtype_name(device, dtype)} matmuls on {device_name(device)}, "
           f"{torch.get_num_threads()} threads, torch {torch.__version__}{_load_text()}")
    return Peak(rate, how, datetime.now(timezone.utc).replace(microsecond=0).isoformat())


def probe_size(device: torch.device, dtype: torch.dtype) -> int:
    if device.type == "cuda":
        return GPU_FP32_PROBE_SIZE if dtype == torch.float32 else GPU_PROBE_SIZE
    if dtype == torch.float32 or (dtype == torch.bfloat16 and cpu_has_native_bf16()):
        return CPU_PROBE_SIZE
    return CPU_EMULATED_PROBE_SIZE


def _load_text() -> str:
    """The machine's load when it was measured: a busy machine's figure reads low."""
    try:
        return f", 1-min load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"
    except OSError:         # not available on this platform
        return ""


def _matmul_rate(n: int, device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of n x n products: the best timed repetition."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *_: None)
    own = torch.Generator(device=device).manual_seed(0)      # the run's random streams stay untouched
    a, b = (torch.randn(n, n, device=device, dtype=dtype, generator=own) for _ in range(2))
    out = torch.empty(n, n, device=device, dtype=dtype)
    torch.matmul(a, b, out=out)          # warm-up: kernel selection (cuBLAS's first call), first touch of memory
    sync(device)
    start = time.perf_counter()
    torch.matmul(a, b, out=out)          # how long one takes: how many a timed repetition needs
    sync(device)
    one = max(time.perf_counter() - start, 1e-9)
    per_repeat = max(1, math.ceil(PROBE_REPEAT_S / one))
    best = math.inf
    for _ in range(PROBE_REPEATS):
        start = time.perf_counter()
        for _ in range(per_repeat):
            torch.matmul(a, b, out=out)
        sync(device)
        best = min(best, (time.perf_counter() - start) / per_repeat)
    return 2 * n ** 3 / best


# -- the cache -------------------------------------------------------------------------
def machine_key(device: torch.device, dtype: torch.dtype) -> str:
    """What a peak depends on: the device and its name, the dtype, torch and its thread count."""
    return (f"{device.type} | {device_name(device)} | {_dtype_name(device, dtype)} | torch {torch.__version__} | "
            f"{torch.get_num_threads()} threads")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")), "")
    except OSError:
        model = ""
    return model or platform.processor() or platform.machine() or "unknown CPU"


def _dtype_name(device: torch.device, dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if device.type == "cuda":
        return f"{name} (TF32)" if dtype == torch.float32 and _tf32_matmuls() else name
    return f"{name} (emulated)" if probe_size(device, dtype) == CPU_EMULATED_PROBE_SIZE else name


def _tf32_matmuls() -> bool:
    """Whether fp32 matmuls on a GPU run as TF32 now (trainer.device.enable_tf32 turns it on)."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):        # PyTorch 2.9+: asking the older switch would warn
        return matmul.fp32_precision == "tf32"
    return bool(matmul.allow_tf32)


def cache_file() -> Path | None:
    """$SMALLGPT_CACHE, else $XDG_CACHE_HOME/smallgpt-lab, else ~/.cache/smallgpt-lab; None without a home."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]) / CACHE_NAME
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "smallgpt-lab" / CACHE_NAME
    try:
        return Path.home() / ".cache" / "smallgpt-lab" / CACHE_NAME
    except RuntimeError:         # no HOME and no password entry: memory only
        return None


def read_cache(path: Path) -> dict[str, Peak]:
    """The cached peaks; an entry that is not a positive finite rate with its text is left out, an
    unreadable or corrupt file reads as empty (measured again and rewritten)."""
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(entries, dict):
        return {}
    return {key: Peak(float(e["flops"]), e["how"], e["measured_at"]) for key, e in entries.items()
            if _valid_entry(e)}


def _valid_entry(entry: object) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("flops"), (int, float))
            and math.isfinite(entry["flops"]) and entry["flops"] > 0
            and isinstance(entry.get("how"), str) and isinstance(entry.get("measured_at"), str))


def write_cache(path: Path, peaks: dict[str, Peak]) -> None:
    """Replace the file whole (trainer.files); a folder that cannot be written only loses the cache."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {key: peak._asdict() for key, peak in peaks.items()})
    except OSError:
        pass

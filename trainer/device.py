"""Where the run executes and in which precision, and how much memory it uses.

TF32: on Ampere and newer GPUs (compute capability 8.0+) an fp32 run lets matmuls and
cuDNN convolutions use TensorFloat-32 (10-bit mantissa inputs, fp32 accumulation), several
times faster on tensor cores and, for training, as accurate in practice. ``place`` decides
it and names it in the device line; ``Placement.apply`` sets it. A T4 (7.5), a CPU, and a
bf16/fp16 run (autocast already uses tensor cores) keep PyTorch's settings untouched.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from trainer.config import TrainConfig
from trainer.errors import ConfigError


@dataclass(frozen=True)
class Placement:
    device: torch.device
    precision: str            # resolved: fp32, bf16 or fp16
    description: str          # e.g. "cpu (AVX512, 2 threads)" or "cuda:0 (NVIDIA A100-SXM4-40GB, TF32 matmuls)"
    tf32: bool = False        # fp32 matmuls may use TF32 (Ampere+ in fp32 only)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def apply(self) -> None:
        """Set the process-wide backend switches this placement decided (only TF32, only when on)."""
        if self.tf32:
            enable_tf32()

    def grad_scaler(self) -> torch.amp.GradScaler:
        # Only fp16 needs loss scaling: its exponent range underflows small gradients.
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")


def place(cfg: TrainConfig) -> Placement:
    device = _resolve_device(cfg.device)
    precision = _resolve_precision(cfg.precision, device)
    tf32 = uses_tf32(device, precision)
    if device.type == "cuda":
        description = f"{device} ({torch.cuda.get_device_name(device)}{', TF32 matmuls' if tf32 else ''})"
    else:
        description = f"cpu ({torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads)"
    return Placement(device, precision, description, tf32)


def uses_tf32(device: torch.device, precision: str) -> bool:
    """TF32 for an fp32 run on a GPU of compute capability 8.0 (Ampere) or newer."""
    return device.type == "cuda" and precision == "fp32" and torch.cuda.get_device_capability(device) >= (8, 0)


def enable_tf32() -> None:
    """TF32 for fp32 matmuls and cuDNN convolutions. PyTorch 2.9+ has one precision setting per
    backend (mixing it with the older allow_tf32 switches warns); earlier versions only those."""
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    else:
        torch.backends.cuda.matmul.allow_tf32 = True    # = torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True


def _resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(["--device 'cuda': no CUDA GPU is visible; use --device cpu or auto"])
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    # This thread's current GPU: cuda:0 unless a study's worker (--devices) or torchrun set another.
    return torch.device("cuda", torch.cuda.current_device())


def _resolve_precision(name: str, device: torch.device) -> str:
    if device.type == "cuda":
        if name == "auto":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"  # a T4 has no bf16
        return name
    if name == "fp16":
        raise ConfigError(["--precision 'fp16': fp16 autocast needs a CUDA GPU; use bf16 or fp32 on the CPU"])
    if name == "auto":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return name


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def memory_snapshot(device: torch.device) -> dict[str, float | None]:
    """Process resident memory and, on a GPU, allocated/reserved/peak, all in MB."""
    mb = 1024 ** 2
    snap: dict[str, float | None] = {
        "mem_process_mb": psutil.Process().memory_info().rss / mb,
        "mem_gpu_allocated_mb": None, "mem_gpu_reserved_mb": None, "mem_gpu_peak_mb": None,
    }
    if device.type == "cuda":
        snap["mem_gpu_allocated_mb"] = torch.cuda.memory_allocated(device) / mb
        snap["mem_gpu_reserved_mb"] = torch.cuda.memory_reserved(device) / mb
        snap["mem_gpu_peak_mb"] = torch.cuda.max_memory_allocated(device) / mb
    return snap

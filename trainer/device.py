"""Where the run executes and in which precision, and how much memory it uses.

Every device decision is made here, from the GPU's compute capability and the kernels this torch
build has (``Gpu``): the trainer (``place``), the notebook's environment line
(``studies.environment``) and the studies consult these functions and no rule of their own.

- precision ``auto``: bf16 on Ampere and newer (8.0+, native bf16); fp16 with a gradient scaler on
  7.x (a T4: fp16 tensor cores, no bf16); fp32 below 7.0 (a P100: no tensor cores, so fp16 gains
  little). ``torch.cuda.is_bf16_supported()`` is not asked: by default it counts emulation and
  answers True on a T4 and a P100.
- refused before anything is written: ``--precision bf16`` below 8.0, ``--compile`` below 7.0
  (Inductor's Triton kernels need 7.0), and a GPU this torch build has no kernels for (Kaggle's
  CUDA 12.8 image with a P100: ``is_available()`` is True, the first operation fails).
- TF32: on 8.0+ an fp32 run lets matmuls and cuDNN convolutions use TensorFloat-32 (10-bit
  mantissa inputs, fp32 accumulation), several times faster on tensor cores and, for training, as
  accurate in practice. ``place`` decides it and names it in the device line; ``Placement.apply``
  sets it. A T4, a CPU, and a bf16/fp16 run (autocast already uses tensor cores) keep PyTorch's
  settings untouched.
- under torchrun each process selects its own GPU (cuda:LOCAL_RANK) before asking any GPU a
  question, so no rank makes a CUDA context on cuda:0 or decides from another rank's GPU.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from trainer.config import TrainConfig
from trainer.distributed import World
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


@dataclass(frozen=True)
class Gpu:
    """One GPU as torch reports it, with the kernels this torch build has: what every device
    decision is made from."""
    index: int
    name: str
    capability: tuple[int, int]
    total_memory: int                     # bytes
    arch_list: tuple[str, ...] = ()       # torch.cuda.get_arch_list(): sm_XY binaries, compute_XY PTX

    @property
    def memory_gb(self) -> float:
        return self.total_memory / 1024 ** 3

    @property
    def sm(self) -> str:
        return "sm_{}{}".format(*self.capability)

    @property
    def native_bf16(self) -> bool:
        return self.capability >= (8, 0)      # Ampere and newer; a T4 (7.5) and a P100 (6.0) emulate it

    @property
    def tensor_cores(self) -> bool:
        return self.capability >= (7, 0)      # Volta and newer: fp16 matmuls on tensor cores

    @property
    def compiles(self) -> bool:
        return self.capability >= (7, 0)      # Inductor writes Triton kernels; Triton needs 7.0+

    @property
    def has_kernels(self) -> bool:
        return build_runs_on(self.arch_list, self.capability)


def read_gpu(index: int) -> Gpu:
    """What torch reports about cuda:``index`` and this build's architectures."""
    props = torch.cuda.get_device_properties(index)
    return Gpu(index, props.name, (props.major, props.minor), props.total_memory, tuple(torch.cuda.get_arch_list()))


def build_runs_on(arch_list: tuple[str, ...], capability: tuple[int, int]) -> bool:
    """Whether a build compiled for ``arch_list`` runs on a GPU of ``capability``: an sm_XY binary
    runs on X.Y and newer GPUs of the same major version (sm_86 on an L4's 8.9), compute_XY PTX on
    any X.Y and newer (compiled on first use). A list with no such entry (a ROCm build) is not judged."""
    parsed = [_ARCH.fullmatch(arch) for arch in arch_list]
    built = [(m[1], (int(m[2]), int(m[3]))) for m in parsed if m]
    if not built:
        return True
    return any(cc <= capability and (kind == "compute" or cc[0] == capability[0]) for kind, cc in built)


_ARCH = re.compile(r"(sm|compute)_(\d+)(\d)[a-z]?")     # sm_86 -> 8.6, sm_100 -> 10.0, sm_90a -> 9.0


def auto_precision(gpu: Gpu) -> str:
    """What ``--precision auto`` runs on ``gpu``."""
    if gpu.native_bf16:
        return "bf16"
    if gpu.tensor_cores:
        return "fp16"      # with a gradient scaler: fp16's exponent range underflows small gradients
    return "fp32"          # no tensor cores (a P100): fp16 saves memory but little time, and needs a scaler


def gpu_refusals(cfg: TrainConfig, gpu: Gpu) -> list[str]:
    """Each reason ``cfg`` cannot run on ``gpu``, naming the flag, the value and the fix."""
    problems = []
    if not gpu.has_kernels:
        problems.append(f"--device {cfg.device!r}: {missing_kernels(gpu)}, or use --device cpu")
    if cfg.precision == "bf16" and not gpu.native_bf16:
        problems.append(
            f"--precision 'bf16': the {gpu.name} (compute capability {gpu.capability[0]}.{gpu.capability[1]}) "
            f"has no native bf16 (8.0+ has it); use --precision auto ({auto_precision(gpu)} here)")
    if cfg.compile and not gpu.compiles:
        problems.append(
            f"--compile: the {gpu.name} (compute capability {gpu.capability[0]}.{gpu.capability[1]}) is too old "
            f"for torch.compile's GPU kernels (Triton needs 7.0+); drop --compile")
    return problems


def missing_kernels(gpu: Gpu) -> str:
    """Why this torch cannot run on ``gpu`` (which has no kernels for it), and the fix."""
    return (f"this torch {torch.__version__} (CUDA {torch.version.cuda}) has no kernels for the {gpu.name} "
            f"({gpu.sm}; it has {' '.join(gpu.arch_list)}): install a torch build that has {gpu.sm} (an older "
            f"torch, or the cu126 or cu118 wheel from https://download.pytorch.org/whl/), use another GPU (a T4)")


def uses_tf32(gpu: Gpu, precision: str) -> bool:
    """TF32 for an fp32 run on a GPU of compute capability 8.0 (Ampere) or newer."""
    return precision == "fp32" and gpu.capability >= (8, 0)


def attention_kernel(gpu: Gpu, precision: str) -> str:
    """The kernel scaled_dot_product_attention is expected to pick: flash needs fp16/bf16 on 8.0+,
    the memory-efficient one runs everywhere else (fp32 included); never the slow math one."""
    if precision in ("fp16", "bf16") and gpu.capability >= (8, 0):
        return "flash attention"
    return "memory-efficient attention"


def place(cfg: TrainConfig) -> Placement:
    """The device, precision and TF32 of a run of ``cfg``; ConfigError if this GPU cannot run it."""
    device = _resolve_device(cfg.device)
    if device.type == "cpu":
        precision = _cpu_precision(cfg.precision)
        threads = torch.get_num_threads()
        return Placement(device, precision, f"cpu ({torch.backends.cpu.get_cpu_capability()}, {threads} threads)")
    gpu = read_gpu(device.index)
    problems = gpu_refusals(cfg, gpu)
    if problems:
        raise ConfigError(problems)
    precision = auto_precision(gpu) if cfg.precision == "auto" else cfg.precision
    tf32 = uses_tf32(gpu, precision)
    notes = ", ".join([gpu.name, *(["TF32 matmuls"] if tf32 else []), attention_kernel(gpu, precision)])
    return Placement(device, precision, f"{device} ({notes})", tf32)


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
    return torch.device("cuda", _select_gpu())


def _select_gpu() -> int:
    """This process's GPU. Under torchrun cuda:LOCAL_RANK, selected before any GPU is asked
    anything: asking first would make a CUDA context on cuda:0 in every rank and decide from
    rank 0's GPU. Otherwise the thread's current GPU: cuda:0 unless a study's worker (--devices)
    selected another."""
    world = World.from_env()
    if not world.parallel:
        return torch.cuda.current_device()
    if world.local_rank >= torch.cuda.device_count():
        raise ConfigError([f"torchrun: LOCAL_RANK {world.local_rank} but {torch.cuda.device_count()} GPU(s) "
                           f"visible; start at most that many processes (--nproc-per-node) or use --device cpu"])
    torch.cuda.set_device(world.local_rank)
    return world.local_rank


def _cpu_precision(name: str) -> str:
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


def newton_schulz_dtype(device: torch.device, gpu: Gpu | None = None) -> torch.dtype:
    """The dtype of Muon's Newton-Schulz iteration (trainer.muon) on ``device``: the best it computes
    natively. bf16 on 8.0+ GPUs, as torch.optim.Muon always does; fp16 on 7.x tensor cores (a T4),
    where trainer.muon divides by the norm in fp32 first so nothing overflows; fp32 on older GPUs (a
    P100: no tensor cores, and auto_precision trains it in fp32) and on CPUs without native bf16, where the
    emulated bf16 iteration was 5x slower (issue 29: 277 s for torch's Muon, 55 s in fp32).
    ``gpu`` is read from ``device`` unless given (tests)."""
    if device.type == "cuda":
        gpu = gpu or read_gpu(device.index if device.index is not None else torch.cuda.current_device())
        if gpu.native_bf16:
            return torch.bfloat16
        return torch.float16 if gpu.tensor_cores else torch.float32
    return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else torch.float32


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

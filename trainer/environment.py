"""Where the code runs: Kaggle, Colab or a local machine, its folders, and its GPUs.

The notebook's first output and a study's Kaggle defaults both come from here. Kaggle is
told by ``KAGGLE_KERNEL_RUN_TYPE`` (set in every Kaggle kernel) or a /kaggle/input folder;
Colab by ``COLAB_RELEASE_TAG`` or an importable ``google.colab``. Nothing here imports torch
unless GPUs are asked for.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

KAGGLE_INPUT, KAGGLE_WORKING = Path("/kaggle/input"), Path("/kaggle/working")
COLAB_DRIVE = Path("/content/drive/MyDrive")


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    memory_gb: float
    capability: tuple[int, int]

    @property
    def bf16(self) -> bool:
        return self.capability >= (8, 0)      # Ampere and newer; a T4 (7.5) and a P100 (6.0) have no bf16


@dataclass(frozen=True)
class Environment:
    platform: str                 # "kaggle", "colab" or "local"
    working_dir: Path             # where outputs go (Kaggle keeps /kaggle/working, 20 GB)
    input_dir: Path | None        # the previous sessions' read-only outputs (Kaggle: /kaggle/input)
    gpus: tuple[Gpu, ...]

    @property
    def precision(self) -> str:
        """What --precision auto resolves to here (trainer.device decides it the same way)."""
        if not self.gpus:
            from trainer.device import cpu_has_native_bf16
            return "bf16 (CPU autocast)" if cpu_has_native_bf16() else "fp32"
        return "bf16" if self.gpus[0].bf16 else "fp16 with a gradient scaler"

    def describe(self, working_dir: Path | None = None) -> str:
        where = {"kaggle": "Kaggle", "colab": "Colab", "local": "a local machine"}[self.platform]
        gpus = ", ".join(f"cuda:{g.index} {g.name} ({g.memory_gb:.1f} GB)" for g in self.gpus) or "no GPU (CPU only)"
        inputs = f"; inputs {self.input_dir}" if self.input_dir else ""
        return (f"running on {where}: working folder {working_dir or self.working_dir}{inputs}; {gpus}; "
                f"precision: {self.precision}")


def platform() -> str:
    if os.environ.get("KAGGLE_KERNEL_RUN_TYPE") or KAGGLE_INPUT.is_dir():
        return "kaggle"
    if os.environ.get("COLAB_RELEASE_TAG") or _importable("google.colab"):
        return "colab"
    return "local"


def detect(drive_folder: str | None = None) -> Environment:
    """The environment, with Colab's working folder on Drive when ``drive_folder`` is given."""
    where = platform()
    if where == "kaggle":
        return Environment(where, KAGGLE_WORKING, KAGGLE_INPUT if KAGGLE_INPUT.is_dir() else None, gpus())
    if where == "colab" and drive_folder:
        return Environment(where, COLAB_DRIVE / drive_folder, None, gpus())
    return Environment(where, Path.cwd(), None, gpus())


def gpus() -> tuple[Gpu, ...]:
    import torch

    if not torch.cuda.is_available():
        return ()
    found = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        found.append(Gpu(i, props.name, props.total_memory / 1024 ** 3, (props.major, props.minor)))
    return tuple(found)


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False

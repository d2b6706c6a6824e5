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
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trainer.device import Gpu

KAGGLE_INPUT, KAGGLE_WORKING = Path("/kaggle/input"), Path("/kaggle/working")
COLAB_DRIVE = Path("/content/drive/MyDrive")


@dataclass(frozen=True)
class Environment:
    platform: str                 # "kaggle", "colab" or "local"
    working_dir: Path             # where outputs go (Kaggle keeps /kaggle/working, 20 GB)
    input_dir: Path | None        # the previous sessions' read-only outputs (Kaggle: /kaggle/input)
    gpus: tuple[Gpu, ...]

    @property
    def precision(self) -> str:
        """What --precision auto resolves to here: trainer.device's decision, as the trainer takes it."""
        from trainer.device import auto_precision, cpu_has_native_bf16
        if not self.gpus:
            return "bf16 (CPU autocast)" if cpu_has_native_bf16() else "fp32"
        precision = auto_precision(self.gpus[0])
        return {"fp16": "fp16 with a gradient scaler",
                "fp32": "fp32 (no tensor cores: fp16 would gain little)"}.get(precision, precision)

    def describe(self, working_dir: Path | None = None) -> str:
        where = {"kaggle": "Kaggle", "colab": "Colab", "local": "a local machine"}[self.platform]
        gpus = ", ".join(f"cuda:{g.index} {g.name} ({g.memory_gb:.1f} GB)" for g in self.gpus) or "no GPU (CPU only)"
        inputs = f"; inputs {self.input_dir}" if self.input_dir else ""
        return (f"running on {where}: working folder {working_dir or self.working_dir}{inputs}; {gpus}; "
                f"precision: {self.precision}{self._gpu_warnings()}")

    def _gpu_warnings(self) -> str:
        from trainer.device import missing_kernels
        return "".join(f"; cuda:{g.index} cannot run: {missing_kernels(g)}" for g in self.gpus if not g.has_kernels)


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

    from trainer.device import read_gpu
    if not torch.cuda.is_available():
        return ()
    return tuple(read_gpu(i) for i in range(torch.cuda.device_count()))


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False

"""GPU utilisation, memory, temperature and power, sampled by a thread of its own through NVML.

    monitor, note = start_gpu_monitor(interval_s=5)     # (None, "why not") on a CPU machine
    ...
    metrics.update(monitor.read())      # mean and max of each GPU since the previous read

NVML comes from ``nvidia-ml-py`` (``import pynvml``, the optional ``gpu`` extra). NVML
calls take tens of microseconds to milliseconds each and a GPU's utilisation is a
fraction of the last sample period, so sampling belongs on a thread of its own, never in
the training step; ``read`` only swaps a list under a lock.
"""
from __future__ import annotations

import os
import statistics
import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence

INSTALL_NOTE = "pip install nvidia-ml-py (or the 'gpu' extra)"
FIELDS = (("util", "util_pct"), ("mem_mb", "mem_used_mb"), ("temp_c", "temp_c"), ("power_w", "power_w"))


@dataclass(frozen=True)
class GpuSample:
    """One reading of one GPU; a field is None where the GPU does not report it (power on some boards)."""

    gpu: int                        # position among the visible GPUs: cuda:<gpu> in torch
    util_pct: float | None
    mem_used_mb: float | None
    temp_c: float | None
    power_w: float | None


def aggregate(samples: Sequence[GpuSample]) -> dict[str, float]:
    """``gpu<k>_<field>`` (the mean) and ``gpu<k>_<field>_max`` for each GPU and field sampled."""
    out: dict[str, float] = {}
    for gpu in sorted({s.gpu for s in samples}):
        mine = [s for s in samples if s.gpu == gpu]
        for name, attr in FIELDS:
            values = [getattr(s, attr) for s in mine if getattr(s, attr) is not None]
            if values:
                out[f"gpu{gpu}_{name}"] = statistics.fmean(values)
                out[f"gpu{gpu}_{name}_max"] = max(values)
    return out


class GpuMonitor:
    """Calls ``sample()`` every ``interval_s`` seconds on a daemon thread; ``read`` aggregates."""

    def __init__(self, sample: Callable[[], list[GpuSample]], interval_s: float = 5.0,
                 on_close: Callable[[], None] | None = None):
        self._sample, self._interval, self._on_close = sample, interval_s, on_close
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._samples: list[GpuSample] = []
        self.errors = 0
        self._thread = threading.Thread(target=self._run, name="gpu-monitor", daemon=True)
        self._thread.start()

    def read(self) -> dict[str, float]:
        with self._lock:
            samples, self._samples = self._samples, []
        return aggregate(samples)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self._interval + 1.0)
        if self._on_close is not None:
            self._on_close()

    def _run(self) -> None:
        while True:
            try:
                taken = self._sample()
            except Exception:           # noqa: BLE001 - a failed reading is skipped, never fatal
                self.errors += 1
            else:
                with self._lock:
                    self._samples.extend(taken)
            if self._stop.wait(self._interval):
                return


def start_gpu_monitor(interval_s: float = 5.0) -> tuple[GpuMonitor | None, str | None]:
    """A running monitor of the visible GPUs, or (None, a note saying why there is none)."""
    try:
        import pynvml
    except ImportError:
        return None, f"GPU utilisation not sampled: NVML is not installed ({INSTALL_NOTE})"
    try:
        pynvml.nvmlInit()
    except Exception as exc:            # noqa: BLE001 - NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return None, f"GPU utilisation not sampled: NVML unavailable ({exc}); no NVIDIA GPU or driver here"
    handles = _visible_handles(pynvml)
    if not handles:
        pynvml.nvmlShutdown()
        return None, "GPU utilisation not sampled: NVML sees no visible GPU"
    return GpuMonitor(lambda: [_read(pynvml, k, h) for k, h in enumerate(handles)], interval_s,
                      on_close=pynvml.nvmlShutdown), None


def _visible_handles(pynvml: Any) -> list[Any]:
    """NVML counts physical GPUs; CUDA_VISIBLE_DEVICES (indices or UUIDs) picks torch's cuda:0, 1, ..."""
    count = pynvml.nvmlDeviceGetCount()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
    handles = []
    for token in (t.strip() for t in visible.split(",") if t.strip()):
        try:
            handle = (pynvml.nvmlDeviceGetHandleByIndex(int(token)) if token.isdigit()
                      else pynvml.nvmlDeviceGetHandleByUUID(token))
        except Exception:               # noqa: BLE001 - an entry NVML does not know (a MIG slice)
            continue
        handles.append(handle)
    return handles


def _read(pynvml: Any, gpu: int, handle: Any) -> GpuSample:
    def get(fn: Callable[[], float]) -> float | None:
        try:
            return float(fn())
        except Exception:               # noqa: BLE001 - NVMLError_NotSupported on some boards
            return None

    return GpuSample(
        gpu,
        get(lambda: pynvml.nvmlDeviceGetUtilizationRates(handle).gpu),
        get(lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2 ** 20),
        get(lambda: pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)),
        get(lambda: pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0),      # milliwatts
    )

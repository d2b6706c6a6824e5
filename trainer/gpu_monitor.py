"""GPU utilisation, memory, temperature and power, sampled by a thread of its own through NVML.

    monitor, note = start_gpu_monitor(interval_s=2, gpus=(0,))   # (None, "why not") on a CPU machine
    ...
    metrics.update(gpu_epoch_metrics(monitor.read()))   # the epoch_metrics columns, since the last read

NVML comes from ``nvidia-ml-py`` (``import pynvml``, the optional ``gpu`` extra). NVML
calls take tens of microseconds to milliseconds each and a GPU's utilisation is a
fraction of the last sample period, so sampling belongs on a thread of its own, never in
the training step; ``read`` only swaps a list under a lock.
"""
from __future__ import annotations

import os
import re
import statistics
import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence

INSTALL_NOTE = "pip install nvidia-ml-py (or the 'gpu' extra)"
CPU_NOTE = "GPU utilisation not sampled: training on the CPU"
FIELDS = (("util", "util_pct"), ("mem_mb", "mem_used_mb"), ("temp_c", "temp_c"), ("power_w", "power_w"))
# The epoch_metrics columns (expdb schema 3) that gpu_epoch_metrics fills.
EPOCH_COLUMNS = ("gpu_util_pct", "gpu_util_max_pct", "gpu_mem_used_mb", "gpu_temp_c", "gpu_power_w")


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


def gpu_epoch_metrics(reading: dict[str, float]) -> dict[str, float | None]:
    """One epoch's GPU columns from a ``read()`` (whose GPUs are the run's: the monitor samples
    no other). Utilisation: the mean over the GPUs of each one's mean, and the highest sample;
    memory used and temperature: the highest sample of any GPU (what runs out or throttles);
    power: each GPU's mean, summed (what the run draws). None where nothing was sampled."""
    def per_gpu(name: str) -> list[float]:      # gpu<k>_<name> of every GPU k in the reading
        return [v for key, v in reading.items() if re.fullmatch(rf"gpu\d+_{name}", key)]

    util, power = per_gpu("util"), per_gpu("power_w")
    highest = {column: max(values) if (values := per_gpu(name)) else None
               for column, name in (("gpu_util_max_pct", "util_max"), ("gpu_mem_used_mb", "mem_mb_max"),
                                    ("gpu_temp_c", "temp_c_max"))}
    return {"gpu_util_pct": statistics.fmean(util) if util else None, **highest,
            "gpu_power_w": sum(power) if power else None}


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


def start_gpu_monitor(interval_s: float = 5.0, gpus: Sequence[int] | None = None
                      ) -> tuple[GpuMonitor | None, str | None]:
    """A running monitor of the visible GPUs, or (None, a note saying why there is none).

    ``gpus``: which visible GPUs (torch's cuda:<k>) to sample; None: all of them; empty: none,
    as for a run on the CPU, which gets only the note.
    """
    if gpus is not None and not gpus:
        return None, CPU_NOTE
    try:
        import pynvml
    except ImportError:
        return None, f"GPU utilisation not sampled: NVML is not installed ({INSTALL_NOTE})"
    try:
        pynvml.nvmlInit()
    except Exception as exc:            # noqa: BLE001 - NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return None, f"GPU utilisation not sampled: NVML unavailable ({exc}); no NVIDIA GPU or driver here"
    handles = _visible_handles(pynvml, gpus)
    if not handles:
        pynvml.nvmlShutdown()
        among = f" among cuda:{', cuda:'.join(map(str, gpus))}" if gpus else ""
        return None, f"GPU utilisation not sampled: NVML sees no visible GPU{among}"
    return GpuMonitor(lambda: [_read(pynvml, k, h) for k, h in handles], interval_s,
                      on_close=pynvml.nvmlShutdown), None


def _visible_handles(pynvml: Any, gpus: Sequence[int] | None) -> list[tuple[int, Any]]:
    """(torch's cuda index, NVML handle) of each GPU asked for (None: every visible one), found
    by the GPU's UUID: CUDA numbers GPUs fastest first and NVML by PCI bus, so cuda:0 need not be
    NVML's GPU 0. By index only where torch gives no UUID; a UUID NVML does not know (a MIG
    slice) is skipped."""
    uuids = _cuda_uuids(gpus)
    if not uuids:
        return [(k, h) for k, h in _handles_by_index(pynvml) if gpus is None or k in gpus]
    handles = []
    for k, uuid in uuids.items():
        try:
            handles.append((k, pynvml.nvmlDeviceGetHandleByUUID(uuid)))
        except Exception:               # noqa: BLE001 - NVMLError_NotFound
            continue
    return handles


def _cuda_uuids(gpus: Sequence[int] | None) -> dict[int, str]:
    """NVML's name of each GPU asked for ("GPU-" and the UUID torch gives without it), by torch's
    cuda index; empty where torch sees no GPU or has no UUID to give (torch before 2.0)."""
    try:
        import torch
        if not torch.cuda.is_available():
            return {}
        indices = range(torch.cuda.device_count()) if gpus is None else gpus
        uuids = {k: str(torch.cuda.get_device_properties(k).uuid) for k in indices}
    except (ImportError, AttributeError, RuntimeError, AssertionError):
        return {}
    if not all(uuids.values()):
        return {}
    return {k: uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}" for k, uuid in uuids.items()}


def _handles_by_index(pynvml: Any) -> list[tuple[int, Any]]:
    """(torch's cuda index, NVML handle) of each visible GPU, assuming both number the GPUs alike.
    NVML counts physical GPUs; CUDA_VISIBLE_DEVICES (indices or UUIDs) picks torch's cuda:0, 1, ... in its order."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [(i, pynvml.nvmlDeviceGetHandleByIndex(i)) for i in range(pynvml.nvmlDeviceGetCount())]
    handles = []
    for k, token in enumerate(t.strip() for t in visible.split(",") if t.strip()):
        try:
            handle = (pynvml.nvmlDeviceGetHandleByIndex(int(token)) if token.isdigit()
                      else pynvml.nvmlDeviceGetHandleByUUID(token))
        except Exception:               # noqa: BLE001 - an entry NVML does not know (a MIG slice)
            continue                    # skipped, and the next entry keeps its own cuda index
        handles.append((k, handle))
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

"""GPU utilisation: the sampler, its epoch columns, and the trainer's wiring, on a machine without a GPU.

Only NVML itself is replaced, because there is no GPU here: by a stand-in ``pynvml`` module
(``FakeNvml``) for ``start_gpu_monitor``, and by a ``sample`` callable of fixed GpuSamples for the
trainer. The monitor's thread, its aggregation, the epoch columns and the database are the real
ones. What no test here covers is the real NVML library answering on a real GPU (see the README).
"""
from __future__ import annotations

import math
import sys
import threading
import time
from types import SimpleNamespace

import pytest
import torch

import expdb
from expdb.models import EpochMetric
from simulated_gpu import simulated_uuid
from trainer.distributed import World, run_gpus
from trainer.gpu_monitor import (CPU_NOTE, EPOCH_COLUMNS, GpuMonitor, GpuSample, aggregate, gpu_epoch_metrics,
                                 start_gpu_monitor)
from trainer.run import train

HANG_S = 60.0      # only a bound on a hang: every wait below ends as soon as its sample is in


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + HANG_S
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {HANG_S} s: the monitor's thread hangs"
        time.sleep(0.01)


# -- aggregation -------------------------------------------------------------------------------
def test_gpu_samples_aggregate_to_mean_and_max_per_gpu():
    samples = [GpuSample(0, 50.0, 1000.0, 60.0, None), GpuSample(0, 100.0, 3000.0, 70.0, None),
               GpuSample(1, 10.0, 500.0, 40.0, 75.0)]
    assert aggregate(samples) == {
        "gpu0_util": 75.0, "gpu0_util_max": 100.0, "gpu0_mem_mb": 2000.0, "gpu0_mem_mb_max": 3000.0,
        "gpu0_temp_c": 65.0, "gpu0_temp_c_max": 70.0,
        "gpu1_util": 10.0, "gpu1_util_max": 10.0, "gpu1_mem_mb": 500.0, "gpu1_mem_mb_max": 500.0,
        "gpu1_temp_c": 40.0, "gpu1_temp_c_max": 40.0, "gpu1_power_w": 75.0, "gpu1_power_w_max": 75.0}
    assert aggregate([]) == {}


def test_epoch_columns_average_utilisation_take_the_highest_memory_and_sum_the_power():
    reading = aggregate([GpuSample(0, 50.0, 1000.0, 60.0, 100.0), GpuSample(0, 100.0, 3000.0, 70.0, 200.0),
                         GpuSample(1, 10.0, 5000.0, 40.0, 75.0), GpuSample(1, 30.0, 4000.0, 45.0, 25.0)])
    assert gpu_epoch_metrics(reading) == {
        "gpu_util_pct": 47.5,          # (75 + 20) / 2: each GPU's mean, averaged over the GPUs
        "gpu_util_max_pct": 100.0,     # the busiest sample of any GPU
        "gpu_mem_used_mb": 5000.0,     # the fullest GPU at its fullest
        "gpu_temp_c": 70.0,            # the hottest sample
        "gpu_power_w": 200.0}          # 150 + 50: the GPUs' mean powers, summed


def test_epoch_columns_are_none_where_nothing_was_sampled():
    assert gpu_epoch_metrics({}) == dict.fromkeys(EPOCH_COLUMNS)
    no_power = gpu_epoch_metrics(aggregate([GpuSample(0, 20.0, 100.0, None, None)]))
    assert no_power["gpu_util_pct"] == 20.0 and no_power["gpu_power_w"] is None and no_power["gpu_temp_c"] is None
    assert set(EPOCH_COLUMNS) <= set(EpochMetric.__table__.columns.keys())


# -- the GPUs of a run -------------------------------------------------------------------------
def test_a_run_samples_its_own_gpu_and_under_torchrun_those_of_its_machine():
    assert run_gpus(torch.device("cpu"), World()) == ()
    assert run_gpus(torch.device("cuda", 1), World()) == (1,)          # a study's worker on cuda:1
    assert run_gpus(torch.device("cuda", 0), World(0, 0, 4, 2)) == (0, 1)   # 2 machines x 2 GPUs: rank 0's two
    world = World.from_env({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"})
    assert world.local_size == 2 and World.from_env({"WORLD_SIZE": "3"}).local_size == 3


# -- the sampler, with NVML replaced -----------------------------------------------------------
class FakeNvml(SimpleNamespace):
    """What start_gpu_monitor calls of pynvml, for physical GPUs 0-3 (GPU 1 reports no power)."""

    NVML_TEMPERATURE_GPU = 0

    def __init__(self):
        super().__init__(shutdowns=0)

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetCount(self):
        return 4

    def nvmlDeviceGetHandleByIndex(self, i):
        if not 0 <= i < 4:
            raise RuntimeError("NVMLError_InvalidArgument")
        return i

    def nvmlDeviceGetHandleByUUID(self, uuid):
        raise RuntimeError("NVMLError_NotFound")          # a MIG slice, say

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=10 * (h + 1))

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(used=(h + 1) * 2 ** 30)     # bytes

    def nvmlDeviceGetTemperature(self, h, sensor):
        return 50 + h

    def nvmlDeviceGetPowerUsage(self, h):
        if h == 1:
            raise RuntimeError("NVMLError_NotSupported")
        return 100_000 + h                                 # milliwatts


def test_the_monitor_samples_only_the_gpus_asked_for_under_cuda_visible_devices(monkeypatch):
    nvml = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    # torch's cuda:0 is physical GPU 3, cuda:1 an entry NVML does not know, cuda:2 physical GPU 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,GPU-unknown,1")
    monitor, note = start_gpu_monitor(interval_s=0.01, gpus=(0, 2))
    assert note is None
    reading = {}        # every sample reads the same, so the readings merge into one
    try:
        wait_for(lambda: reading.update(monitor.read()) or reading, "sample")
    finally:
        monitor.stop()
    assert {k for k in reading if k.endswith("_util")} == {"gpu0_util", "gpu2_util"}
    assert (reading["gpu0_util"], reading["gpu0_mem_mb"], reading["gpu0_temp_c"], reading["gpu0_power_w"]) \
        == (40.0, 4096.0, 53.0, 100.003)
    assert (reading["gpu2_util"], reading["gpu2_mem_mb"], "gpu2_power_w" in reading) == (20.0, 2048.0, False)
    assert nvml.shutdowns == 1


class NvmlByBus(FakeNvml):
    """NVML numbering two GPUs by PCI bus, the reverse of CUDA's fastest-first order: NVML's GPU 0
    is torch's cuda:1 (found by its UUID, which NVML writes "GPU-<uuid>")."""

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByUUID(self, uuid):
        by_uuid = {f"GPU-{simulated_uuid(1)}": 0, f"GPU-{simulated_uuid(0)}": 1}
        if uuid not in by_uuid:
            raise RuntimeError("NVMLError_NotFound")
        return by_uuid[uuid]


def test_the_monitor_finds_each_gpu_by_its_uuid_not_by_its_index(monkeypatch, simulated_gpu):
    simulated_gpu("T4 x2")
    monkeypatch.setitem(sys.modules, "pynvml", NvmlByBus())
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monitor, note = start_gpu_monitor(interval_s=0.01, gpus=(0,))
    reading = {}
    try:
        wait_for(lambda: reading.update(monitor.read()) or reading, "sample")
    finally:
        monitor.stop()
    assert note is None and {k for k in reading if k.endswith("_util")} == {"gpu0_util"}
    assert reading["gpu0_util"] == 20.0             # NVML's GPU 1, which is torch's cuda:0


def test_no_gpu_to_sample_gives_no_monitor_only_a_note(monkeypatch):
    assert start_gpu_monitor(interval_s=0.01, gpus=()) == (None, CPU_NOTE)     # a CPU run: NVML not even asked
    nvml = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-unknown")
    monitor, note = start_gpu_monitor(interval_s=0.01, gpus=(0,))
    assert monitor is None and note == "GPU utilisation not sampled: NVML sees no visible GPU among cuda:0"
    assert nvml.shutdowns == 1
    monkeypatch.setitem(sys.modules, "pynvml", None)           # nvidia-ml-py not installed
    monitor, note = start_gpu_monitor(interval_s=0.01)
    assert monitor is None and "nvidia-ml-py" in note


def test_no_gpu_monitor_without_a_gpu_only_a_note():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the absent path is not what it takes")
    monitor, note = start_gpu_monitor(interval_s=0.1)
    assert monitor is None and note.startswith("GPU utilisation not sampled")


def test_a_failed_reading_is_counted_and_skipped():
    calls = []

    def sample():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("NVMLError_GpuIsLost")
        return [GpuSample(0, 5.0, 1.0, 30.0, 10.0)]

    monitor = GpuMonitor(sample, interval_s=0.01)
    try:
        wait_for(lambda: len(calls) >= 2, "second sample")
    finally:
        monitor.stop()
    assert monitor.errors == 1 and monitor.read()["gpu0_util"] == 5.0


# -- the trainer -------------------------------------------------------------------------------
def test_the_trainer_samples_off_its_thread_and_fills_the_epoch_columns(tiny_cfg, tiny_data, tmp_path):
    """train() with a GpuMonitor whose sample() returns fixed GpuSamples (two GPUs): the real
    monitor thread and aggregation, the real recorder and SQLite file; NVML alone is replaced,
    as this machine has no GPU."""
    sampled_on, started, closed = set(), [], threading.Event()

    def sample():
        sampled_on.add(threading.current_thread())
        return [GpuSample(0, 90.0, 6000.0, 65.0, 120.0), GpuSample(1, 70.0, 8000.0, 72.0, 100.0)]

    def start(interval_s, gpus):
        monitor = GpuMonitor(sample, interval_s=0.01, on_close=closed.set)
        started.append((interval_s, gpus))
        # the first sample is in before the first step, so the epoch's reading has it whatever the speed
        wait_for(lambda: sampled_on, "first sample")
        return monitor, None

    lines = []
    with expdb.open(tmp_path / "experiments.db") as db:
        result = train(tiny_cfg.replace(epochs=1), db.recorder(), data=tiny_data, gpu_monitor=start,
                       log=lines.append)
        row = db.epochs(result.run_id).iloc[0]
    assert [row[c] for c in EPOCH_COLUMNS] == [80.0, 90.0, 8000.0, 72.0, 220.0]
    assert started == [(2.0, ())]           # once per train(); the run's GPUs: none, on this CPU
    assert closed.is_set()                  # stopped when the run ended
    assert threading.current_thread() not in sampled_on and {t.name for t in sampled_on} == {"gpu-monitor"}
    assert not any("GPU utilisation" in line for line in lines)


def test_a_cpu_run_has_null_gpu_columns_and_says_why_once(tiny_cfg, tiny_data, tmp_path):
    lines = []
    with expdb.open(tmp_path / "experiments.db") as db:
        result = train(tiny_cfg.replace(epochs=1), db.recorder(), data=tiny_data, log=lines.append)
        row = db.epochs(result.run_id).iloc[0]
    assert all(math.isnan(row[c]) for c in EPOCH_COLUMNS) and row["train_loss"] > 0
    assert lines.count(CPU_NOTE) == 1

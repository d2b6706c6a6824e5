"""A simulated GPU for tests on the CPU: torch answers as if a given GPU were there. No GPU runs.

The fixture ``simulated_gpu`` replaces, with pytest's ``monkeypatch`` (undone after the test), the
answers torch gives at its API: ``torch.cuda.is_available``, ``device_count``,
``get_device_capability``, ``get_device_name``, ``get_device_properties`` (name, major, minor,
total_memory, uuid, multi_processor_count), ``get_arch_list``, ``mem_get_info`` and the memory
counters, ``torch.version.cuda``, and the emulated-bf16 probe behind ``is_bf16_supported``. Nothing
computes on a GPU: a test can check decisions (precision, compile, TF32, refusals) and which CUDA
calls were made, in which order, on which device, but no tensor can really live on ``cuda``.

    def test_x(simulated_gpu):
        gpu = simulated_gpu("T4 x2")             # a name of DEVICES
        ...                                      # code under test asks torch.cuda
        assert gpu.calls[0] == ("set_device", 1)

``gpu.calls`` lists every recorded CUDA call as ``(name, device)``: ``device`` is the index of the
GPU the call touched (resolved as torch would: ``None``/``"cuda"`` mean the thread's current
device), or ``None`` for a call on every GPU (``manual_seed_all``, ``get_rng_state_all``,
``set_rng_state_all``). Recorded: set_device (also entering ``torch.cuda.device(i)``),
current_device, the device queries (get_device_capability, get_device_name,
get_device_properties, mem_get_info), init, empty_cache, synchronize, get/set_rng_state(_all),
manual_seed(_all), reset_peak_memory_stats, memory_allocated, memory_reserved,
max_memory_allocated, and the ``torch.cuda.default_generators[i]`` methods (get_state, set_state,
manual_seed, as ``("generator.get_state", i)``...). ``gpu.rng_states[i]`` is GPU i's generator
state (a uint8 tensor), which the RNG calls read and write, so a save/restore round-trips.

``torch.cuda.is_bf16_supported`` itself is torch's own function; only its last step,
``_check_bf16_tensor_supported`` (which makes a bf16 tensor on the GPU), is simulated: it succeeds
where the build has kernels for the GPU, as on real hardware, so a T4 answers True with emulation
and False with ``including_emulation=False``. Like real CUDA, the current device is per thread.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch

GIB = 1024 ** 3

# torch.cuda.get_arch_list() of official wheels. The cu12.8 builds dropped Pascal (sm_60): Kaggle's
# image with a P100 reports "sm_60 is not compatible with the current PyTorch installation".
ARCHES_CU126 = ("sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90")
ARCHES_CU128 = ("sm_70", "sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120")


@dataclass(frozen=True)
class SimulatedDevice:
    """One named machine: its GPU model, how many of them, and the torch build it runs."""
    name: str                        # what get_device_name answers
    capability: tuple[int, int]
    total_memory: int                # bytes, as get_device_properties reports (less than the label)
    multi_processor_count: int
    count: int = 1
    arch_list: tuple[str, ...] = ARCHES_CU128
    cuda_version: str = "12.8"


DEVICES: dict[str, SimulatedDevice] = {
    "T4": SimulatedDevice("Tesla T4", (7, 5), 15_828_320_256, 40),
    "T4 x2": SimulatedDevice("Tesla T4", (7, 5), 15_828_320_256, 40, count=2),
    # Kaggle's current image: a P100 with a torch built for CUDA 12.8 (no sm_60 kernels)
    "P100 cu12.8": SimulatedDevice("Tesla P100-PCIE-16GB", (6, 0), 17_071_734_784, 56),
    # the same card with a build that has its kernels (cu12.6): what is left to refuse is the GPU itself
    "P100": SimulatedDevice("Tesla P100-PCIE-16GB", (6, 0), 17_071_734_784, 56,
                            arch_list=ARCHES_CU126, cuda_version="12.6"),
    "L4": SimulatedDevice("NVIDIA L4", (8, 9), 23_580_639_232, 58),
    "A100": SimulatedDevice("NVIDIA A100-SXM4-40GB", (8, 0), 42_505_273_344, 108),
    "H100": SimulatedDevice("NVIDIA H100 80GB HBM3", (9, 0), 85_031_714_816, 132),
}


class SimulatedUuid:
    """Like torch's ``_CUuuid``: ``str()`` gives 8-4-4-4-12 hex digits, without NVML's "GPU-" prefix."""

    def __init__(self, text: str):
        self._text = text

    @property
    def bytes(self) -> bytes:
        return bytes.fromhex(self._text.replace("-", ""))

    def __str__(self) -> str:
        return self._text


@dataclass(frozen=True)
class SimulatedProperties:
    """The fields of ``torch.cuda.get_device_properties`` that this project reads."""
    name: str
    major: int
    minor: int
    total_memory: int
    multi_processor_count: int
    uuid: SimulatedUuid


def simulated_uuid(index: int) -> str:
    return f"5e1f0c2a-7d1b-4c3e-9a00-{index:012x}"


class SimulatedGenerator:
    """Stands in for ``torch.cuda.default_generators[i]``; reads and writes the GPU's state."""

    def __init__(self, gpu: "SimulatedGpu", index: int):
        self._gpu, self.index = gpu, index

    def get_state(self) -> torch.Tensor:
        self._gpu.record("generator.get_state", self.index)
        return self._gpu.rng_states[self.index].clone()

    def set_state(self, state: torch.Tensor) -> None:
        self._gpu.record("generator.set_state", self.index)
        self._gpu.rng_states[self.index] = state.clone()

    def manual_seed(self, seed: int) -> "SimulatedGenerator":
        self._gpu.record("generator.manual_seed", self.index)
        self._gpu.rng_states[self.index] = seeded_state(seed)
        return self

    def initial_seed(self) -> int:
        return int(self._gpu.rng_states[self.index][0])


def seeded_state(seed: int) -> torch.Tensor:
    """A distinct, deterministic fake generator state for a seed (real CUDA states are 16 bytes)."""
    return torch.tensor([(seed + k) % 256 for k in range(16)], dtype=torch.uint8)


@dataclass
class SimulatedGpu:
    """The machine a test asked for, the calls made on it, and each GPU's generator state."""
    device: SimulatedDevice
    calls: list[tuple[str, int | None]] = field(default_factory=list)
    rng_states: list[torch.Tensor] = field(default_factory=list)
    memory_used: int = 0             # bytes other processes and the CUDA context hold (mem_get_info)

    def __post_init__(self):
        self._thread = threading.local()
        self._lock = threading.Lock()
        self.rng_states = [seeded_state(100 + i) for i in range(self.device.count)]

    def record(self, name: str, device: int | None) -> None:
        with self._lock:
            self.calls.append((name, device))

    def calls_named(self, *names: str) -> list[tuple[str, int | None]]:
        return [call for call in self.calls if call[0] in names]

    def devices_touched(self) -> set[int | None]:
        return {device for _, device in self.calls}

    @property
    def current(self) -> int:
        return getattr(self._thread, "index", 0)

    def index_of(self, device=None) -> int:
        """The GPU a ``device`` argument means, as torch resolves it; refuses what torch refuses."""
        if device is None:
            return self.current
        if isinstance(device, str):
            device = torch.device(device)
        if isinstance(device, torch.device):
            if device.type != "cuda":
                raise ValueError(f"Expected a cuda device, but got: {device}")
            device = self.current if device.index is None else device.index
        if not 0 <= device < self.device.count:
            raise AssertionError("Invalid device id")     # what torch raises for an ordinal out of range
        return device

    def has_kernels(self, index: int) -> bool:
        """Whether the build runs on GPU ``index``: an sm_XY of its capability, or a PTX compute_XY at or below."""
        major, minor = self.device.capability
        for arch in self.device.arch_list:
            kind, _, digits = arch.partition("_")
            built_for = (int(digits[:-1]), int(digits[-1]))
            if (kind == "sm" and built_for == (major, minor)) or (kind == "compute" and built_for <= (major, minor)):
                return True
        return False

    def properties(self, index: int) -> SimulatedProperties:
        d = self.device
        return SimulatedProperties(d.name, d.capability[0], d.capability[1], d.total_memory,
                                   d.multi_processor_count, SimulatedUuid(simulated_uuid(index)))


def _queries(gpu: SimulatedGpu) -> dict[str, Callable]:
    """Replacements for torch.cuda's device queries; each records the device it was asked about."""
    def asked(name: str, answer: Callable[[int], object]) -> Callable:
        def query(device=None):
            index = gpu.index_of(device)
            gpu.record(name, index)
            return answer(index)
        return query

    return {
        "get_device_capability": asked("get_device_capability", lambda i: gpu.device.capability),
        "get_device_name": asked("get_device_name", lambda i: gpu.device.name),
        "get_device_properties": asked("get_device_properties", gpu.properties),
        "mem_get_info": asked("mem_get_info", lambda i: (gpu.device.total_memory - gpu.memory_used,
                                                         gpu.device.total_memory)),
        "memory_allocated": asked("memory_allocated", lambda i: 0),
        "memory_reserved": asked("memory_reserved", lambda i: 0),
        "max_memory_allocated": asked("max_memory_allocated", lambda i: 0),
        "reset_peak_memory_stats": asked("reset_peak_memory_stats", lambda i: None),
        "synchronize": asked("synchronize", lambda i: None),
    }


def _device_selection(gpu: SimulatedGpu) -> dict[str, Callable]:
    def set_device(device) -> None:
        index = gpu.index_of(device)
        gpu.record("set_device", index)
        gpu._thread.index = index

    def current_device() -> int:
        gpu.record("current_device", gpu.current)
        return gpu.current

    def exchange_device(index: int) -> int:
        # what entering/leaving ``torch.cuda.device(i)`` calls: select i, return the previous one
        if index < 0:
            return -1
        previous = gpu.current
        set_device(index)
        return previous

    return {"set_device": set_device, "current_device": current_device,
            "_exchange_device": exchange_device, "_maybe_exchange_device": exchange_device,
            "empty_cache": lambda: gpu.record("empty_cache", gpu.current)}


def _random(gpu: SimulatedGpu) -> dict[str, Callable]:
    def get_rng_state(device="cuda") -> torch.Tensor:
        index = gpu.index_of(device)
        gpu.record("get_rng_state", index)
        return gpu.rng_states[index].clone()

    def set_rng_state(new_state: torch.Tensor, device="cuda") -> None:
        index = gpu.index_of(device)
        gpu.record("set_rng_state", index)
        gpu.rng_states[index] = new_state.clone()

    def get_rng_state_all() -> list[torch.Tensor]:
        gpu.record("get_rng_state_all", None)
        return [state.clone() for state in gpu.rng_states]

    def set_rng_state_all(new_states) -> None:
        gpu.record("set_rng_state_all", None)
        for index, state in enumerate(new_states):
            gpu.rng_states[index] = state.clone()

    def manual_seed(seed: int) -> None:              # seeds the current device only
        gpu.record("manual_seed", gpu.current)
        gpu.rng_states[gpu.current] = seeded_state(int(seed))

    def manual_seed_all(seed: int) -> None:          # what torch.manual_seed also calls
        gpu.record("manual_seed_all", None)
        gpu.rng_states = [seeded_state(int(seed)) for _ in gpu.rng_states]

    return {"get_rng_state": get_rng_state, "set_rng_state": set_rng_state,
            "get_rng_state_all": get_rng_state_all, "set_rng_state_all": set_rng_state_all,
            "manual_seed": manual_seed, "manual_seed_all": manual_seed_all}


def install(monkeypatch: pytest.MonkeyPatch, device: SimulatedDevice) -> SimulatedGpu:
    gpu = SimulatedGpu(device)
    replacements = {
        **_queries(gpu), **_device_selection(gpu), **_random(gpu),
        "is_available": lambda: True,
        "init": lambda: gpu.record("init", None),       # CUDA initialises on every call here
        "_lazy_init": lambda: None,
        "is_initialized": lambda: True,
        "device_count": lambda: device.count,
        "get_arch_list": lambda: list(device.arch_list),
        # torch's is_bf16_supported ends by making a bf16 tensor on the GPU: that works wherever the
        # build has kernels for it (sm_75 and sm_60 included), which is why it answers True on a T4.
        "_check_bf16_tensor_supported": lambda dev: gpu.has_kernels(gpu.index_of(dev)),
        "default_generators": tuple(SimulatedGenerator(gpu, i) for i in range(device.count)),
    }
    for name, replacement in replacements.items():
        monkeypatch.setattr(torch.cuda, name, replacement)
        for module in (torch.cuda.memory, torch.cuda.random):     # callers that name the submodule
            if hasattr(module, name):
                monkeypatch.setattr(module, name, replacement)
    monkeypatch.setattr(torch.version, "cuda", device.cuda_version)
    return gpu


@pytest.fixture
def simulated_gpu(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], SimulatedGpu]:
    """``simulated_gpu(name)`` makes torch report the GPU(s) of ``DEVICES[name]``; returns its ``SimulatedGpu``."""
    def make(name: str) -> SimulatedGpu:
        return install(monkeypatch, DEVICES[name])
    return make

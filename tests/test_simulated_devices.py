"""The device decisions for each GPU our users train on, with the GPU simulated at torch's API
(tests/simulated_gpu.py: torch answers as that GPU would; nothing runs on a GPU).

Per GPU: what ``--precision auto`` picks, TF32, the attention kernel named in the device line,
``--compile``, the refusals and their messages; under torchrun, the order of CUDA calls; at a
checkpoint, whose random generator is read and written; a CPU run makes no CUDA call at all.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from simulated_gpu import DEVICES
from trainer.checkpoints import capture as capture_module
from trainer.checkpoints.capture import capture, restore
from trainer.config import TrainConfig
from trainer.device import build_runs_on, place, read_gpu
from trainer.distributed import join
from studies.environment import Environment, gpus
from trainer.errors import ConfigError
from trainer.state import TrainState

# GPU: (precision auto picks, TF32 in fp32, the attention kernel of an auto run, --compile allowed)
DECISIONS = {
    "T4": ("fp16", False, "memory-efficient attention", True),
    "T4 x2": ("fp16", False, "memory-efficient attention", True),
    "P100": ("fp32", False, "memory-efficient attention", False),   # no tensor cores: fp16 gains little
    "L4": ("bf16", True, "flash attention", True),
    "A100": ("bf16", True, "flash attention", True),
    "H100": ("bf16", True, "flash attention", True),
}
TORCHRUN_RANK_1 = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}


def cuda_cfg(**changes) -> TrainConfig:
    return TrainConfig(device="cuda", **changes)


def refusals(cfg: TrainConfig) -> list[str]:
    with pytest.raises(ConfigError) as refused:
        place(cfg)
    return refused.value.problems


def test_every_named_gpu_is_in_the_table():
    assert set(DECISIONS) | {"P100 cu12.8"} == set(DEVICES)


# -- precision, TF32, attention, compile ------------------------------------------------------
@pytest.mark.parametrize("name", DECISIONS)
def test_auto_precision_tf32_and_attention_follow_the_compute_capability(simulated_gpu, name):
    precision, tf32, attention, _ = DECISIONS[name]
    simulated_gpu(name)
    auto = place(cuda_cfg(precision="auto"))
    assert (auto.precision, auto.tf32) == (precision, False)      # TF32 is for fp32 runs only
    assert auto.grad_scaler().is_enabled() == (precision == "fp16")
    assert auto.description == f"cuda:0 ({DEVICES[name].name}, {attention})"
    fp32 = place(cuda_cfg(precision="fp32"))
    assert fp32.tf32 == tf32 and ("TF32 matmuls" in fp32.description) == tf32


@pytest.mark.parametrize("name", DECISIONS)
def test_the_notebook_environment_line_names_the_precision_the_trainer_takes(simulated_gpu, name):
    simulated_gpu(name)
    environment = Environment("kaggle", Path("/kaggle/working"), None, gpus())
    assert environment.precision.split(" ")[0] == place(cuda_cfg()).precision
    assert "cannot run" not in environment.describe()


@pytest.mark.parametrize("name", [n for n, decision in DECISIONS.items() if decision[3]])
def test_compile_is_allowed_from_compute_capability_7(simulated_gpu, name):
    simulated_gpu(name)
    assert place(cuda_cfg(compile=True)).device == torch.device("cuda", 0)


# -- refusals, before anything is written -----------------------------------------------------
@pytest.mark.parametrize("name, capability, auto", [("T4", "7.5", "fp16"), ("P100", "6.0", "fp32")])
def test_bf16_is_refused_without_native_bf16(simulated_gpu, name, capability, auto):
    simulated_gpu(name)
    assert torch.cuda.is_bf16_supported()       # torch counts emulation: why the trainer does not ask it
    assert refusals(cuda_cfg(precision="bf16")) == [
        f"--precision 'bf16': the {DEVICES[name].name} (compute capability {capability}) has no native bf16 "
        f"(8.0+ has it); use --precision auto ({auto} here)"]


def test_compile_is_refused_on_a_p100(simulated_gpu):
    simulated_gpu("P100")
    assert refusals(cuda_cfg(compile=True)) == [
        "--compile: the Tesla P100-PCIE-16GB (compute capability 6.0) is too old for torch.compile's GPU "
        "kernels (Triton needs 7.0+); drop --compile"]


def test_a_torch_build_without_kernels_for_the_gpu_is_refused_with_every_other_problem(simulated_gpu):
    simulated_gpu("P100 cu12.8")
    assert torch.cuda.is_available()            # what torch says; the first operation would fail
    problems = refusals(TrainConfig(device="auto", precision="bf16", compile=True))
    assert len(problems) == 3 and [p.split(":")[0] for p in problems] == ["--device 'auto'", "--precision 'bf16'",
                                                                         "--compile"]
    assert problems[0].startswith("--device 'auto': this torch ")
    assert "(CUDA 12.8) has no kernels for the Tesla P100-PCIE-16GB (sm_60; it has sm_70 sm_75" in problems[0]
    assert "install a torch build that has sm_60 (an older torch, or the cu126 or cu118 wheel" in problems[0]
    line = Environment("kaggle", Path("/kaggle/working"), None, gpus()).describe()
    assert "cuda:0 cannot run: this torch" in line and "sm_60" in line


def test_the_command_line_refuses_a_bad_device_before_writing_anything(simulated_gpu, tmp_path, monkeypatch,
                                                                       capsys):
    from trainer.__main__ import main

    simulated_gpu("T4")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exited:
        main(["--precision", "bf16", "--out", "run", "--db", "runs.db"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "python -m trainer: error: --precision 'bf16': the Tesla T4 (compute capability 7.5) has no native bf16 "
        "(8.0+ has it); use --precision auto (fp16 here)"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("arch_list, capability, runs", [
    (("sm_70", "sm_75", "sm_80", "sm_86", "sm_90"), (8, 9), True),    # an L4 runs sm_86 binaries
    (("sm_70", "sm_75", "sm_80"), (6, 0), False),                     # a P100 on a cu12.8 build
    (("sm_80", "sm_90"), (7, 5), False),                              # binaries only run on newer GPUs
    (("sm_80", "compute_70"), (7, 5), True),                          # PTX: compiled on first use
    (("sm_80", "compute_80"), (7, 5), False),
    (("sm_90a", "sm_100"), (10, 0), True),
    (("gfx90a",), (9, 0), True),                                      # not a CUDA list: not judged
])
def test_a_build_runs_on_a_gpu_it_has_a_binary_or_ptx_for(arch_list, capability, runs):
    assert build_runs_on(arch_list, capability) is runs


# -- torchrun: each rank takes its own GPU before asking anything ----------------------------
def test_under_torchrun_rank_1_selects_cuda_1_before_any_gpu_is_asked(simulated_gpu, monkeypatch):
    gpu = simulated_gpu("T4 x2")
    for name, value in TORCHRUN_RANK_1.items():
        monkeypatch.setenv(name, value)
    placement = place(cuda_cfg())
    assert gpu.calls[0] == ("set_device", 1)
    assert 0 not in gpu.devices_touched()                         # no CUDA context on rank 0's GPU
    assert placement.device == torch.device("cuda", 1) and placement.precision == "fp16"
    # joining names the rank and asks no GPU again (the process group is taken as joined)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    calls = len(gpu.calls)
    world, joined = join(placement)
    assert world.rank == 1 and joined.device == placement.device and gpu.calls[calls:] == []
    assert joined.description.endswith(", rank 1 of 2")


def test_under_torchrun_more_processes_than_gpus_is_refused(simulated_gpu, monkeypatch):
    gpu = simulated_gpu("T4")
    for name, value in TORCHRUN_RANK_1.items():
        monkeypatch.setenv(name, value)
    assert refusals(cuda_cfg()) == ["torchrun: LOCAL_RANK 1 but 1 GPU(s) visible; start at most that many "
                                    "processes (--nproc-per-node) or use --device cpu"]
    assert gpu.calls_named("set_device") == []


# -- checkpoints: the run's own GPU generator only --------------------------------------------
@pytest.fixture
def parts():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    return {"model": model, "optimizer": None, "scaler": torch.amp.GradScaler("cpu", enabled=False)}


def snapshot_of(parts):
    return capture(**parts, state=TrainState(step=3), config={}, kind="step")


def on_gpu(monkeypatch, index: int) -> None:
    # No tensor can live on a simulated GPU: the model is taken to be on cuda:<index>.
    monkeypatch.setattr(capture_module, "model_device", lambda model: torch.device("cuda", index))


def test_a_checkpoint_reads_and_restores_only_the_runs_gpu_generator(simulated_gpu, monkeypatch, parts):
    gpu = simulated_gpu("T4 x2")
    on_gpu(monkeypatch, 1)
    saved = gpu.rng_states[1].clone()
    snapshot = snapshot_of(parts)
    assert gpu.calls == [("synchronize", 1), ("get_rng_state", 1)]
    gpu.rng_states[1] = torch.zeros(16, dtype=torch.uint8)        # the run drew on
    other_trial = gpu.rng_states[0].clone()
    gpu.calls.clear()
    restore(snapshot, **parts)
    assert gpu.calls == [("set_rng_state", 1)]
    assert torch.equal(gpu.rng_states[1], saved) and torch.equal(gpu.rng_states[0], other_trial)


def test_a_one_gpu_checkpoint_resumes_exactly_on_another_index_of_a_two_gpu_machine(simulated_gpu, monkeypatch,
                                                                                    parts):
    colab = simulated_gpu("T4")
    on_gpu(monkeypatch, 0)
    saved = colab.rng_states[0].clone()
    snapshot = snapshot_of(parts)
    kaggle = simulated_gpu("T4 x2")
    on_gpu(monkeypatch, 1)
    restore(snapshot, **parts)
    assert kaggle.calls == [("set_rng_state", 1)] and torch.equal(kaggle.rng_states[1], saved)


@pytest.mark.parametrize("saved_indices, run_index, restored", [
    ((0, 1), 1, 1),     # an older checkpoint of every GPU: the one of the run's index
    ((0,), 1, 0),       # an older one-GPU checkpoint on a two-GPU machine: the one saved
])
def test_older_checkpoints_with_every_gpus_generator_still_restore(simulated_gpu, monkeypatch, parts,
                                                                   saved_indices, run_index, restored):
    snapshot = snapshot_of(parts)
    states = {i: torch.full((16,), 10 + i, dtype=torch.uint8) for i in saved_indices}
    snapshot.tensors[capture_module.RNG_FILE] = {"torch_cpu": torch.get_rng_state(),
                                                 **{f"torch_cuda_{i}": s for i, s in states.items()}}
    gpu = simulated_gpu("T4 x2")
    on_gpu(monkeypatch, run_index)
    restore(snapshot, **parts)
    assert gpu.calls == [("set_rng_state", run_index)] and torch.equal(gpu.rng_states[run_index], states[restored])


def test_a_cpu_run_on_a_gpu_machine_makes_no_cuda_call_at_its_checkpoints(simulated_gpu, parts):
    gpu = simulated_gpu("T4")
    snapshot = snapshot_of(parts)
    restore(snapshot, **parts)
    assert gpu.calls == [] and "torch_cuda" not in snapshot.tensors[capture_module.RNG_FILE]


def test_a_cpu_training_run_on_a_gpu_machine_makes_no_cuda_call(simulated_gpu, tiny_cfg, tiny_data):
    from trainer.run import train

    gpu = simulated_gpu("T4")
    result = train(tiny_cfg.replace(device="cpu", max_steps=3, save_every=2), data=tiny_data, log=lambda *_: None)
    assert result.status == "completed" and result.final_checkpoint is not None
    assert gpu.calls == []


def test_read_gpu_asks_only_the_gpu_it_names(simulated_gpu):
    gpu = simulated_gpu("T4 x2")
    assert read_gpu(1).memory_gb == pytest.approx(14.74, abs=0.01)
    assert gpu.calls == [("get_device_properties", 1)]

"""TF32 is for fp32 runs on Ampere and newer GPUs only: on the CPU and a T4 nothing changes.
(The GPUs are simulated at torch's API, tests/simulated_gpu.py; on a real GPU tests/test_cuda.py.)"""
import pytest
import torch

from trainer.config import TrainConfig
from trainer.device import place


def backend_settings():
    return (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
            torch.get_float32_matmul_precision())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_on_the_cpu_the_device_line_claims_no_tf32_and_no_setting_changes(precision):
    before = backend_settings()
    placement = place(TrainConfig(device="cpu", precision=precision))
    placement.apply()
    assert placement.tf32 is False and "TF32" not in placement.description
    assert placement.description.startswith("cpu (")
    assert backend_settings() == before


@pytest.mark.parametrize("name, tf32", [("T4", False), ("P100", False), ("L4", True), ("A100", True), ("H100", True)])
def test_an_fp32_run_turns_tf32_on_from_ampere_only(simulated_gpu, name, tf32):
    simulated_gpu(name)
    saved = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    try:
        place(TrainConfig(device="cuda", precision="fp32")).apply()
        after = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
        assert after == (("tf32", "tf32") if tf32 else saved)    # cuDNN's convolutions default to TF32 already
        assert saved[0] != "tf32"                                  # matmuls do not: the test means something
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = saved

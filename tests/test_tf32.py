"""TF32 is for fp32 runs on Ampere and newer GPUs only: on the CPU nothing changes.
(The GPU side is in tests/test_cuda.py, which skips without CUDA.)"""
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

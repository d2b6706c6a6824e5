"""Model FLOPs utilisation: the share of the devices' peak arithmetic a run's tokens/s uses.

MFU = 6 x parameters x tokens/s / (peak FLOPS x devices): forward and backward of a dense
transformer take about 6 FLOPs per parameter per token (attention's own FLOPs left out, as
the PaLM paper's simple form does). The peaks are the vendors' dense 16-bit tensor-core
figures; a GPU not in the table, and the CPU, have no MFU (None).
"""
from __future__ import annotations

import math

import torch

# Peak dense FLOPS in the 16-bit type each GPU trains in (vendor datasheets), by name fragment.
PEAK_FLOPS = {"T4": 65e12, "P100": 18.7e12, "V100": 125e12, "A10G": 70e12, "L4": 121e12,
              "A100": 312e12, "H100": 989e12, "H200": 989e12}


def peak_flops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_FLOPS.items() if k in device_name), None)


def utilisation(flops_per_token: float, tokens_per_s: float, device: torch.device, devices: int = 1) -> float | None:
    """MFU in [0, 1] of a run on ``devices`` such devices; None on the CPU or an unknown GPU."""
    if device.type != "cuda" or not math.isfinite(tokens_per_s):
        return None
    peak = peak_flops(torch.cuda.get_device_name(device))
    return flops_per_token * tokens_per_s / (peak * devices) if peak else None

"""Dense peak FLOP/s of the GPUs MFU is reported for.

Keyed by the exact name torch.cuda.get_device_name() gives (less "NVIDIA "), per mixed_precision;
"no" is fp32, which runs on TF32 tensor cores (launch.environment.make_accelerator allows it).
Variants differ (H100 SXM, PCIe and NVL are three numbers), so a name not listed gets no MFU rather
than a guess.
"""

from __future__ import annotations

import torch

_HOPPER_SXM = {"bf16": 989e12, "fp16": 989e12, "no": 494e12}
_AMPERE_A100 = {"bf16": 312e12, "fp16": 312e12, "no": 156e12}
PEAK_FLOPS = {
    "H100 80GB HBM3": _HOPPER_SXM,
    "H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "no": 378e12},
    "H100 NVL": {"bf16": 835e12, "fp16": 835e12, "no": 417e12},
    "H200": _HOPPER_SXM,
    "H200 NVL": {"bf16": 835e12, "fp16": 835e12, "no": 417e12},
    "A100-SXM4-40GB": _AMPERE_A100,
    "A100-SXM4-80GB": _AMPERE_A100,
    "A100-PCIE-40GB": _AMPERE_A100,
    "A100 80GB PCIe": _AMPERE_A100,
    "A10": {"bf16": 125e12, "fp16": 125e12, "no": 62.5e12},
    "L4": {"bf16": 121e12, "fp16": 121e12, "no": 60e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "no": 183e12},
    "GeForce RTX 4090": {"bf16": 165e12, "fp16": 165e12, "no": 82.6e12},
}


def peak_flops_for(name: str, precision: str) -> float | None:
    """The peak for a GPU name as torch reports it, or None for a GPU not in the table."""
    table = PEAK_FLOPS.get(name.strip().removeprefix("NVIDIA ").strip())
    return None if table is None else table[precision]


def peak_flops(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda":
        return None
    return peak_flops_for(torch.cuda.get_device_name(device), precision)

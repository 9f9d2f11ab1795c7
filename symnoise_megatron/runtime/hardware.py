"""What each GPU kind offers: dense peak throughput and memory, as the planner and the
throughput log line read them."""

from __future__ import annotations

from typing import Optional

import torch

# Dense BF16 peak per GPU (TFLOP/s).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
# Hopper's FP8 tensor cores double the BF16 peak; Ampere has none.
FP8_DOUBLES_PEAK = ("H100", "H200")
GPU_MEMORY_GB = {"H100": 80.0, "H200": 141.0, "A100": 80.0}


def peak_tflops(gpu: str, fp8: bool) -> float:
    """Dense peak TFLOP/s of ``gpu`` (a key of :data:`PEAK_TFLOPS`) with BF16 or FP8 GEMMs."""
    return PEAK_TFLOPS[gpu] * (2 if fp8 and gpu in FP8_DOUBLES_PEAK else 1)


def device_peak_tflops(fp8: bool) -> Optional[float]:
    """The peak of this process's GPU, recognised by name; None on CPU or an unknown GPU."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for gpu in PEAK_TFLOPS:
        if gpu in name:
            return peak_tflops(gpu, fp8)
    return None

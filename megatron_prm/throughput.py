"""Throughput figures of a training step: tokens/s, model FLOPs utilisation, peak memory, time left.

MFU is the model FLOPs of the step (Megatron-LM's formula, :mod:`megatron_prm.flops`, without the LM-head
term since the PRM head never computes full-vocabulary logits) over the time taken and the peak of all
accelerators. Peaks are dense bf16 figures from the vendors' data sheets; ``peak_tflops`` overrides them.
"""

from __future__ import annotations

import resource
import sys
from typing import Optional

import torch

# Dense bf16 tensor-core TFLOP/s per GPU (no sparsity), by a substring of torch.cuda.get_device_name();
# the first match wins, so the more specific names come first.
PEAK_TFLOPS_BF16 = (
    ("GB200", 2500.0),
    ("B200", 2250.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100", 989.0),   # SXM
    ("H800", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("A10G", 70.0),
    ("A10", 125.0),
)


def peak_tflops(device: torch.device, configured: Optional[float]) -> Optional[float]:
    """``configured`` when set, else the table's figure for this GPU; None on CPU or an unknown GPU."""
    if configured is not None:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops for key, tflops in PEAK_TFLOPS_BF16 if key in name), None)


def mfu(flops: float, seconds: float, devices: int, peak: Optional[float]) -> Optional[float]:
    """Model FLOPs utilisation in [0, 1] (None without a peak)."""
    if peak is None or seconds <= 0:
        return None
    return flops / seconds / (devices * peak * 1e12)


def peak_memory_gib(device: torch.device) -> float:
    """This process's peak: allocated accelerator memory on a GPU, resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss_kib / (2**30 if sys.platform == "darwin" else 2**20)  # bytes on macOS, KiB on Linux


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def progress_line(step: int, total: int, figures: dict, device_type: str) -> str:
    """The one line printed per logging step."""
    mfu_value = figures.get("mfu")
    memory = "peak mem" if device_type == "cuda" else "peak rss"
    return " | ".join([
        f"step {step}/{total}",
        f"loss {figures['loss']:.4f}",
        f"step acc {figures['accuracy']:.3f}",
        f"lr {figures['lr']:.3g}",
        f"{figures['tokens_per_s']:,.0f} tok/s",
        f"MFU {mfu_value:.1%}" if mfu_value is not None else "MFU n/a",
        f"{memory} {figures['peak_memory_gib']:.2f} GiB",
        f"ETA {format_duration(figures['eta_s'])}",
    ])

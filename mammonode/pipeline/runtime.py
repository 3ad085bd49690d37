"""PyTorch's process-wide settings, set once by the caller that owns the process.

The pipeline itself never changes global state; the worker and ``mammonode predict`` call
:func:`configure_torch` before running it, and the benchmarks do the same.
"""

from __future__ import annotations

import os

import torch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def configure_torch(device: str, precision: str = "fp32", threads: int | None = None) -> torch.device:
    """Threads for CPU inference (all this process may use, unless given) and TF32 on CUDA
    (only when ``precision == "tf32"``; the fp32 reference path keeps it off)."""
    resolved = resolve_device(device)
    if threads:
        torch.set_num_threads(threads)
    elif resolved.type == "cpu":
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    if resolved.type == "cuda":
        torch.backends.cudnn.allow_tf32 = precision == "tf32"
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    return resolved

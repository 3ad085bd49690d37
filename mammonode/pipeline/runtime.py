"""PyTorch's process-wide settings, set once by the caller that owns the process.

The pipeline itself never changes global state; the worker and ``mammonode predict`` call
:func:`configure_torch` before running it, and the benchmarks do the same.
"""

from __future__ import annotations

import os
import re

import torch

DEVICE_NAMES = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


class DeviceUnavailable(RuntimeError):
    """The device is a valid name but this machine (or this PyTorch build) does not have it."""


def check_device(name: str) -> torch.device:
    """The device ``name`` resolves to here. ValueError for a name that is not a device;
    DeviceUnavailable for a CUDA device this machine cannot use."""
    if not DEVICE_NAMES.match(name):
        raise ValueError(f"device {name!r}: expected auto, cpu, cuda or cuda:N")
    device = resolve_device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build of PyTorch" if torch.version.cuda is None else "no usable CUDA device"
            raise DeviceUnavailable(f"device {name}: CUDA is not available here ({build})")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise DeviceUnavailable(f"device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


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

"""PyTorch's process-wide settings, set once by the caller that owns the process.

The pipeline itself never changes global state; the worker and ``mammonode predict`` call
:func:`configure_torch` before running it, and the benchmarks do the same.
"""

from __future__ import annotations

import ctypes
import ctypes.util
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


def configure_torch(
    device: str, precision: str = "fp32", threads: int | None = None, keep_buffers: bool = True
) -> torch.device:
    """Threads for CPU inference (all this process may use, unless given), TF32 on CUDA
    (only when ``precision == "tf32"``; the fp32 reference path keeps it off), and the
    allocator's reuse of freed buffers (:func:`keep_freed_buffers`)."""
    resolved = resolve_device(device)
    if keep_buffers:
        keep_freed_buffers()
    if threads:
        torch.set_num_threads(threads)
    elif resolved.type == "cpu":
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    if resolved.type == "cuda":
        torch.backends.cudnn.allow_tf32 = precision == "tf32"
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    return resolved


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
_KEEP_BELOW = 256 << 20


def keep_freed_buffers() -> bool:
    """Let freed tensor buffers be reused instead of handed back to the kernel (glibc only).

    Each patch-model batch allocates and frees about 200 MB of activations. glibc serves
    blocks over 32 MB (and, in a thread's own arena, most large ones) with fresh mmap pages
    and returns them at free, so every batch page-faulted and zeroed its buffers again:
    measured here 46,000 minor faults per batch of 8 and a fifth of the CPU time. Called once
    by a command that runs the pipeline, before it starts threads: one arena for all threads
    (the workers run in threads), blocks under 256 MB from the heap, and the heap trimmed
    only when 256 MB lie free at its top. Numbers are unchanged; returns whether applied.
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False  # not glibc: its allocator has its own policy
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return all(
        mallopt(param, value) == 1
        for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_THRESHOLD, _KEEP_BELOW), (_M_TRIM_THRESHOLD, _KEEP_BELOW))
    )

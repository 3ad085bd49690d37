"""How a model is run for inference: memory layout and precision, in one place.

Channels-last is oneDNN's faster layout on CPU; ``bf16`` runs the network under autocast (an
opt-in fast mode whose deviation from fp32 the benchmarks print). The fp32 path is the
reference path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def prepare_model(model: nn.Module, channels_last: bool) -> nn.Module:
    return model.to(memory_format=torch.channels_last) if channels_last else model


def as_input(tensor: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    tensor = tensor.to(device, non_blocking=True)
    return tensor.contiguous(memory_format=torch.channels_last) if channels_last else tensor


def infer(model: Callable[[Any], Any], inputs: Any, device: torch.device, precision: str) -> Any:
    """``model(inputs)`` without autograd, under bf16 autocast when asked for."""
    with torch.inference_mode():
        if precision == "bf16":
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                return model(inputs)
        return model(inputs)

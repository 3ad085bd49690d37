"""How a model is run for inference: memory layout and precision, in one place.

Channels-last is oneDNN's faster layout on CPU; ``bf16`` runs the network under autocast (an
opt-in fast mode whose deviation from fp32 the benchmarks print). The fp32 path is the
reference path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


def prepare_model(model: nn.Module, channels_last: bool) -> nn.Module:
    return model.to(memory_format=torch.channels_last) if channels_last else model


def as_input(tensor: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """``tensor`` on ``device`` in the layout the model runs in (a no-op where it is so)."""
    tensor = tensor.to(device, non_blocking=True)
    return tensor.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def infer(model: Callable[[Any], Any], inputs: Any, device: torch.device, precision: str) -> Any:
    """``model(inputs)`` without autograd, under bf16 autocast when asked for."""
    with torch.inference_mode():
        if precision == "bf16":
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                return model(inputs)
        return model(inputs)


def compile_fixed(model: nn.Module, example: torch.Tensor, device: torch.device, precision: str) -> Callable | None:
    """``model`` compiled by TorchInductor for inputs shaped like ``example`` (weights frozen
    as constants, so batch norms fold into the convolutions), warmed up once here so that
    the compile cost lands at load time, once per worker. None, with a WARNING, where this
    machine cannot compile (TorchInductor's CPU code needs a C++ compiler): the caller runs
    the model as it is. Compiled code reorders float arithmetic: the benchmarks print its
    deviation from the reference."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    compiled = torch.compile(model, dynamic=False)
    try:
        infer(compiled, example.to(device), device, precision)
    except Exception as exc:  # noqa: BLE001 - any compiler failure leaves the eager model, which is correct
        log.warning("could not compile the model (%s: %s); running it uncompiled", type(exc).__name__, exc)
        return None
    return compiled

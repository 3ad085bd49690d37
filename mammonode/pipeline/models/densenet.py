"""DenseNet-121 patch classifier with TensorFlow-style "SAME" padding.

The NYU patch classifier was trained in TensorFlow and ported to PyTorch by wrapping every
convolution and pooling layer of torchvision's densenet121 so that it pads like TF "SAME"
(asymmetric: the extra pixel goes to the bottom/right). Module names follow torchvision's
densenet so the original state_dict loads (after the loader maps the old
``norm.1``/``conv.1`` spelling to ``norm1``/``conv1``).

Where the SAME padding happens to be symmetric (every 3x3 stride-1 convolution) we use the
convolution's own padding instead of a separate pad, which is the same arithmetic without an
extra copy; only the stem's 7x7/2 convolution pads explicitly (its max pool needs no copy,
see :class:`SamePadMaxPool2d`).

Rearrangements that leave the function unchanged cut the work (measured on a 2-core CPU,
alternating in one process: 1.32x patches/s over the original's arrangement): a transition
pools before its 1x1 convolution, and :func:`fold_batch_norms` moves the loaded model's
batch norms into convolutions, leaving one clamp where a norm and a ReLU were.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "SAME" padding (before, after) for one spatial axis."""
    if size % stride == 0:
        total = max(0, kernel - stride)
    else:
        total = max(0, kernel - size % stride)
    return total // 2, total - total // 2


class SamePadConv2d(nn.Conv2d):
    """Conv2d that pads like TensorFlow "SAME" for whatever input size it gets."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs["padding"] = 0
        super().__init__(*args, **kwargs)
        kh, kw = self.kernel_size
        sh, sw = self.stride
        # Symmetric cases (odd kernel, stride 1) use the convolution's own zero padding.
        self._native = sh == 1 and sw == 1 and kh % 2 == 1 and kw % 2 == 1
        if self._native:
            self.padding = (kh // 2, kw // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._native:
            top, bottom = same_padding(x.shape[2], self.kernel_size[0], self.stride[0])
            left, right = same_padding(x.shape[3], self.kernel_size[1], self.stride[1])
            if top or bottom or left or right:
                x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


class SamePadMaxPool2d(nn.MaxPool2d):
    """Max pool with TF "SAME" zero padding, for a non-negative (post-ReLU) input.

    The original pads with zeros. On a non-negative input a zero never raises a maximum, so
    where all the padding is after (bottom/right, as for an even side) ceil mode gives the
    same maxima without the padded copy: its last window is the SAME one, clipped to the
    input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = same_padding(x.shape[2], self.kernel_size, self.stride)
        left, right = same_padding(x.shape[3], self.kernel_size, self.stride)
        if top or left or not all(_ceil_mode_fits(x.shape[i], self.kernel_size, self.stride) for i in (2, 3)):
            return super().forward(F.pad(x, (left, right, top, bottom)))
        return F.max_pool2d(x, self.kernel_size, self.stride, ceil_mode=True)


def _ceil_mode_fits(size: int, kernel: int, stride: int) -> bool:
    """Whether an unpadded ceil-mode pool has as many windows as a SAME one."""
    return kernel >= stride and -(-(size - kernel) // stride) + 1 == -(-size // stride)


class SamePadAvgPool2d(nn.AvgPool2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = same_padding(x.shape[2], self.kernel_size, self.stride)
        left, right = same_padding(x.shape[3], self.kernel_size, self.stride)
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


class DenseLayer(nn.Module):
    def __init__(self, in_features: int, growth_rate: int, bn_size: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = SamePadConv2d(in_features, bn_size * growth_rate, kernel_size=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = SamePadConv2d(bn_size * growth_rate, growth_rate, kernel_size=3, bias=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.relu1(self.norm1(features)))
        return self.conv2(self.relu2(self.norm2(h)))


class DenseBlock(nn.ModuleDict):
    """Dense block that writes each layer's output into one preallocated buffer, so the
    growing concatenation is never copied (torchvision re-concatenates for every layer)."""

    def __init__(self, num_layers: int, in_features: int, growth_rate: int, bn_size: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.growth_rate = growth_rate
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}", DenseLayer(in_features + i * growth_rate, growth_rate, bn_size))

    @property
    def out_features(self) -> int:
        return self.in_features + len(self) * self.growth_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        memory_format = (
            torch.channels_last
            if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
            else torch.contiguous_format
        )
        buffer = torch.empty((n, self.out_features, h, w), dtype=x.dtype, device=x.device, memory_format=memory_format)
        buffer[:, : self.in_features] = x
        filled = self.in_features
        for layer in self.values():
            out = layer(buffer[:, :filled])
            buffer[:, filled : filled + self.growth_rate] = out
            filled += self.growth_rate
        return buffer


class Transition(nn.Sequential):
    """Batch norm, ReLU, 1x1 convolution and 2x2 average pool, computed with the pool first.

    The convolution (no bias) and the pool are both linear and act on different axes
    (channels, space), so they commute; pooling first gives the convolution a quarter of
    the pixels, which removes three quarters of the transitions' multiply-adds (about 8 %
    of the network's). Zero padding, if a size were odd, commutes too: conv(0) = 0."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.add_module("norm", nn.BatchNorm2d(in_features))
        self.add_module("relu", nn.ReLU(inplace=True))
        self.add_module("conv", SamePadConv2d(in_features, out_features, kernel_size=1, bias=False))
        self.add_module("pool", SamePadAvgPool2d(kernel_size=2, stride=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.norm, ChannelClamp) and (x.shape[2] % 2 or x.shape[3] % 2):
            # The pool would pad with zeros, which the folded shift (now in the conv's bias)
            # would wrongly reach: the folded model is only for the even sides it runs on.
            raise ValueError(f"a folded transition needs even sides, got {tuple(x.shape[2:])}")
        return self.conv(self.pool(self.relu(self.norm(x))))


class DenseNet121(nn.Module):
    """densenet121 (growth 32, blocks 6/12/24/16, 64 initial features, bn_size 4)."""

    def __init__(self, num_classes: int = 4, in_channels: int = 3) -> None:
        super().__init__()
        growth, bn_size, features = 32, 4, 64
        self.features = nn.Sequential()
        self.features.add_module("conv0", SamePadConv2d(in_channels, features, kernel_size=7, stride=2, bias=False))
        self.features.add_module("norm0", nn.BatchNorm2d(features))
        self.features.add_module("relu0", nn.ReLU(inplace=True))
        self.features.add_module("pool0", SamePadMaxPool2d(kernel_size=3, stride=2))
        for i, num_layers in enumerate((6, 12, 24, 16)):
            block = DenseBlock(num_layers, features, growth, bn_size)
            self.features.add_module(f"denseblock{i + 1}", block)
            features = block.out_features
            if i != 3:
                self.features.add_module(f"transition{i + 1}", Transition(features, features // 2))
                features //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(features))
        self.classifier = nn.Linear(features, num_classes)
        self.deep_start = list(self.features._modules).index("transition2")

    def forward(self, x: torch.Tensor, front_batch: int = 0) -> torch.Tensor:
        """Logits for a batch of patches. ``front_batch``: run the layers before the second
        transition (the high-resolution ones, with the largest activations) that many
        patches at a time and the deeper ones on the whole batch. Each patch's logits are
        the same either way; on a CPU the small front batches keep their activations in
        cache while the deep layers' small matrix products run faster on a large batch
        (measured on 2 cores, alternating in one process: 8 then 32, 1.06-1.07x patches/s
        against 8 throughout)."""
        if 0 < front_batch < len(x):
            front, deep = self.features[: self.deep_start], self.features[self.deep_start :]
            h = deep(torch.cat([front(part) for part in x.split(front_batch)]))
        else:
            h = self.features(x)
        h = F.adaptive_avg_pool2d(F.relu(h), 1).flatten(1)
        return self.classifier(h)


def grey_input_densenet(model: DenseNet121) -> DenseNet121:
    """Turn a 3-channel model into one that takes the grey patch once.

    The original feeds each grey patch three times as RGB; convolving three equal channels
    with w equals convolving one channel with w summed over channels, so we sum conv0 once
    instead of copying every patch three times.
    """
    conv0 = model.features.conv0
    if conv0.in_channels == 1:
        return model
    grey = SamePadConv2d(1, conv0.out_channels, kernel_size=conv0.kernel_size, stride=conv0.stride, bias=False)
    with torch.no_grad():
        grey.weight.copy_(conv0.weight.sum(dim=1, keepdim=True))
    model.features.conv0 = grey.to(conv0.weight.device, conv0.weight.dtype).train(conv0.training)
    return model


class ChannelAffine(nn.Module):
    """``x * scale + shift`` per channel: an eval-mode batch norm with its statistics folded.

    Same arithmetic as the batch norm's CPU kernel (which precomputes the same two vectors),
    but one elementwise pass that also runs fast on a channel slice of a buffer, where
    PyTorch's batch norm takes a path twice as slow."""

    def __init__(self, norm: nn.BatchNorm2d) -> None:
        super().__init__()
        scale, shift = _scale_shift(norm)
        self.register_buffer("scale", scale.reshape(1, -1, 1, 1).clone())
        self.register_buffer("shift", shift.reshape(1, -1, 1, 1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift, x, self.scale)


class ChannelClamp(nn.Module):
    """``x`` clamped per channel to [low, high]: what is left of batch norm + ReLU once their
    scale and shift are moved into the 1x1 convolution that follows (:func:`fold_norm_relu`).
    One elementwise pass (``maximum`` where no channel has an upper bound) instead of two."""

    def __init__(self, low: torch.Tensor, high: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("low", low.reshape(1, -1, 1, 1).clone())
        self.register_buffer("high", high.reshape(1, -1, 1, 1).clone())
        self.lower_only = bool(torch.isposinf(high).all())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.maximum(x, self.low) if self.lower_only else torch.clamp(x, self.low, self.high)


def _scale_shift(norm: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
        return scale, norm.bias - norm.running_mean * scale


def fold_norm_relu(norm: nn.BatchNorm2d, conv: nn.Conv2d) -> tuple[ChannelClamp, nn.Conv2d]:
    """``conv(relu(norm(x)))`` as ``conv'(clamp(x))`` for an unpadded 1x1 ``conv``.

    Per channel, with the norm's scale a and shift b and t = -b/a: relu(a x + b) equals
    a max(x, t) + b where a > 0, a min(x, t) + b where a < 0, and relu(b) where a = 0. The
    factor a goes into the convolution's weights, the constant b into its bias (a 1x1
    convolution of a constant is the constant times the weights). Float rounding differs
    from the unfolded layers only in the last bits."""
    if conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.padding != (0, 0) or conv.groups != 1:
        raise ValueError("fold_norm_relu needs an unpadded 1x1 convolution")
    scale, shift = (v.double() for v in _scale_shift(norm))
    threshold = -shift / scale
    flat = (scale == 0) | ~torch.isfinite(threshold.float())  # relu(a x + b) is relu(b) for any x here
    scale = torch.where(flat, 0.0, scale)
    shift = torch.where(flat, shift.clamp_min(0), shift)
    inf = torch.full_like(threshold, float("inf"))
    low = torch.where(flat, 0.0, torch.where(scale > 0, threshold, -inf))
    high = torch.where(flat, 0.0, torch.where(scale < 0, threshold, inf))
    weight = conv.weight.detach().double()  # (out, in, 1, 1)
    bias = torch.zeros(conv.out_channels, dtype=torch.float64) if conv.bias is None else conv.bias.detach().double()
    folded = nn.Conv2d(conv.in_channels, conv.out_channels, kernel_size=1, bias=True)
    with torch.no_grad():
        folded.weight.copy_(weight * scale.reshape(1, -1, 1, 1))
        folded.bias.copy_(bias + weight.flatten(1) @ shift)
    dtype, device = conv.weight.dtype, conv.weight.device
    return ChannelClamp(low.to(dtype), high.to(dtype)).to(device), folded.to(device, dtype)


def fold_batch_norms(model: DenseNet121) -> DenseNet121:
    """The loaded model (eval mode) for inference with no batch norm left.

    A batch norm that follows a convolution (the stem's norm0, each dense layer's norm2)
    becomes that convolution's bias, removing a pass over its output. One that is followed
    by a ReLU and a 1x1 convolution (each dense layer's norm1, a transition's norm, whose
    2x2 average pool is linear and unpadded on this network's even sides) leaves a
    :class:`ChannelClamp` and moves into that convolution (:func:`fold_norm_relu`); norm5
    becomes a :class:`ChannelAffine`. Only float rounding changes (about 1e-7 in the
    softmax); the fidelity tests compare the result with the original's outputs. Training
    would need the unfolded model: this is for loading weights to run them.
    """
    if model.training:
        raise ValueError("fold_batch_norms is for a model in eval mode")
    features = model.features
    if isinstance(features.norm0, nn.BatchNorm2d):
        features.conv0 = fuse_conv_bn_eval(features.conv0, features.norm0)
        features.norm0 = nn.Identity()
    for module in list(model.modules()):
        if isinstance(module, DenseLayer) and isinstance(module.norm2, nn.BatchNorm2d):
            module.conv1 = fuse_conv_bn_eval(module.conv1, module.norm2)
            module.norm2 = nn.Identity()
        if isinstance(module, (DenseLayer, Transition)):
            names = ("norm1", "relu1", "conv1") if isinstance(module, DenseLayer) else ("norm", "relu", "conv")
            norm, conv = getattr(module, names[0]), getattr(module, names[2])
            if isinstance(norm, nn.BatchNorm2d):
                clamp, conv = fold_norm_relu(norm, conv)
                setattr(module, names[0], clamp)
                setattr(module, names[1], nn.Identity())
                setattr(module, names[2], conv)
    for owner in list(model.modules()):
        for name, child in list(owner.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                setattr(owner, name, ChannelAffine(child))
    return model


# torchvision 0.2 spelled a dense layer's sub-modules ``norm.1``/``conv.1``; NYU's patch model
# file keeps that spelling. PyTorch accepts it too (DenseNet's _load_from_state_dict).
_OLD_SPELLING = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12]\.(?:weight|bias|running_mean|running_var))$")
_NEW_SPELLING = re.compile(r"(denselayer\d+\.(?:norm|conv))([12])\.")


def from_original_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The original file's keys in this module's spelling."""
    out = {}
    for key, value in state.items():
        match = _OLD_SPELLING.match(key)
        out[match.group(1) + match.group(2) if match else key] = value
    return out


def to_original_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This module's keys in the original file's spelling (for writing test weights)."""
    return {_NEW_SPELLING.sub(r"\1.\2.", k): v for k, v in state.items()}

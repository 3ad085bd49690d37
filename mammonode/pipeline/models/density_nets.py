"""NYU breast_density_classifier models: the multi-view CNN and the histogram MLP.

Both output the probabilities of the four BI-RADS composition categories (a, b, c, d).
Module names follow the original ``models_torch.py`` so its state_dicts load strictly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mammonode.exam.views import VIEWS

# (name, in, out, stride) of the 13 view-shared convolution pairs, in the original order.
_CONVS = (
    ("conv1", 1, 32, 2),
    ("conv2a", 32, 64, 2),
    ("conv2b", 64, 64, 1),
    ("conv2c", 64, 64, 1),
    ("conv3a", 64, 128, 1),
    ("conv3b", 128, 128, 1),
    ("conv3c", 128, 128, 1),
    ("conv4a", 128, 128, 1),
    ("conv4b", 128, 128, 1),
    ("conv4c", 128, 128, 1),
    ("conv5a", 128, 256, 1),
    ("conv5b", 256, 256, 1),
    ("conv5c", 256, 256, 1),
)
# Max pool (kernel = stride) applied before these convolutions.
_POOL_BEFORE = {"conv2a": 3, "conv3a": 2, "conv4a": 2, "conv5a": 2}


class ViewPairConv(nn.Module):
    """One 3x3 valid convolution for CC views and one for MLO views, each followed by ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.cc = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride)
        self.mlo = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride)

    def forward(self, view: str, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.cc(x) if view.endswith("CC") else self.mlo(x))


class DensityCNN(nn.Module):
    """BaselineBreastModel: four 1-channel views (2600x2000, standardised, facing right)."""

    def __init__(self) -> None:
        super().__init__()
        self._conv_layer_ls = nn.ModuleList(ViewPairConv(i, o, s) for _, i, o, s in _CONVS)
        self.fc1 = nn.Linear(256 * 4, 256 * 4)
        self.fc2 = nn.Linear(256 * 4, 4)

    def view_features(self, view: str, x: torch.Tensor) -> torch.Tensor:
        for (name, *_), conv in zip(_CONVS, self._conv_layer_ls):
            if name in _POOL_BEFORE:
                k = _POOL_BEFORE[name]
                x = F.max_pool2d(x, kernel_size=k, stride=k)
            if name == "conv4a":
                # The original pads one column on the right before the fourth stage.
                x = F.pad(x, (0, 1, 0, 0))
            x = conv(view, x)
        return x.flatten(2).mean(-1)

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        h = torch.cat([self.view_features(view, x[view]) for view in VIEWS], dim=1)
        h = F.relu(self.fc1(h))
        return F.softmax(self.fc2(h), dim=1)


class DensityHistogramModel(nn.Module):
    """BaselineHistogramModel: a 2-layer MLP over four 50-bin normalised histograms."""

    def __init__(self, num_bins: int = 50):
        super().__init__()
        self.fc1 = nn.Linear(num_bins * 4, 100)
        self.fc2 = nn.Linear(100, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.fc2(F.relu(self.fc1(x))), dim=1)

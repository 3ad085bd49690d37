"""Build each named model and fill it from its weight file."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from mammonode.pipeline.models.densenet import DenseNet121, grey_input_densenet
from mammonode.pipeline.models.density import DensityCNN, DensityHistogramModel
from mammonode.pipeline.models.resnet22 import SplitBreastModel
from mammonode.pipeline.weights import load_strict, model_file, read_state_dict

_NESTED = {"image_only": "model", "image_heatmaps": "model"}


def _architecture(name: str) -> nn.Module:
    if name == "patch":
        return DenseNet121(num_classes=4, in_channels=3)
    if name == "image_only":
        return SplitBreastModel(input_channels=1)
    if name == "image_heatmaps":
        return SplitBreastModel(input_channels=3)
    if name == "density_cnn":
        return DensityCNN()
    if name == "density_histogram":
        return DensityHistogramModel(num_bins=50)
    raise KeyError(name)


def load_model(name: str, weights_dir: Path) -> nn.Module:
    path = model_file(weights_dir, name)
    model = load_strict(_architecture(name), read_state_dict(path, _NESTED.get(name)), path)
    if name == "patch":
        model = grey_input_densenet(model)
    return model

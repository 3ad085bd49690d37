"""The one registry of models: what each is called, where its weights live, how it is built.

Every other module (pipeline stages, weights tooling, result objects, the CLI) asks this
registry; adding a model is one entry here plus its table in ``weights/manifest.toml``.
Importing it does not import PyTorch: builders import their architecture when called.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class ManifestEntry:
    """A model's table in weights/manifest.toml: its file name and where the file comes from."""

    name: str
    file: str
    architecture: str
    role: str
    origin: str
    license: str
    sha256: str  # of the official file; "" when not published


def manifest_path() -> Path:
    packaged = Path(__file__).resolve().parent.parent / "weights_manifest.toml"
    if packaged.exists():
        return packaged
    return Path(__file__).resolve().parents[2] / "weights" / "manifest.toml"


@lru_cache(maxsize=1)
def manifest() -> dict[str, ManifestEntry]:
    with open(manifest_path(), "rb") as fh:
        data = tomllib.load(fh)
    return {name: ManifestEntry(name=name, **fields) for name, fields in data["models"].items()}


def _patch() -> nn.Module:
    from mammonode.pipeline.models.densenet import DenseNet121

    return DenseNet121(num_classes=4, in_channels=3)


def _split_breast(channels: int) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from mammonode.pipeline.models.resnet22 import SplitBreastModel

        return SplitBreastModel(input_channels=channels)

    return build


def _image_breast(channels: int) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from mammonode.pipeline.models.imagewise import ImageBreastModel

        return ImageBreastModel(input_channels=channels)

    return build


def _density_cnn() -> nn.Module:
    from mammonode.pipeline.models.density_nets import DensityCNN

    return DensityCNN()


def _density_histogram() -> nn.Module:
    from mammonode.pipeline.models.density_nets import DensityHistogramModel

    return DensityHistogramModel(num_bins=50)


def _densenet_key_maps() -> tuple[Callable, Callable]:
    from mammonode.pipeline.models.densenet import from_original_keys, to_original_keys

    return from_original_keys, to_original_keys


@dataclass(frozen=True)
class ModelSpec:
    name: str
    title: str  # in result objects
    short_title: str  # in tables and the summary image
    build: Callable[[], nn.Module]  # the architecture, untrained
    nested_key: str | None = None  # the original file wraps the state_dict: {nested_key: state_dict}
    original_names: tuple[str, ...] = ()  # file names in the original repositories
    key_maps: Callable[[], tuple[Callable, Callable]] | None = None  # (from, to) the original spelling

    @property
    def manifest(self) -> ManifestEntry:
        return manifest()[self.name]

    @property
    def file(self) -> str:
        return self.manifest.file

    def from_original(self, state: dict[str, Any]) -> dict[str, Any]:
        return self.key_maps()[0](state) if self.key_maps else state

    def to_original(self, state: dict[str, Any]) -> dict[str, Any]:
        return self.key_maps()[1](state) if self.key_maps else state


_SPECS = (
    ModelSpec(
        "patch",
        "NYU patch classifier (DenseNet-121)",
        "patch",
        _patch,
        original_names=("sample_patch_model.p",),
        key_maps=_densenet_key_maps,
    ),
    ModelSpec(
        "image_only",
        "NYU image-only model (view-split ResNet-22)",
        "image-only",
        _split_breast(1),
        nested_key="model",
        original_names=("sample_image_model.p",),
    ),
    ModelSpec(
        "image_heatmaps",
        "NYU image+heatmaps model (view-split ResNet-22)",
        "image+heatmaps",
        _split_breast(3),
        nested_key="model",
        original_names=("sample_imageheatmaps_model.p",),
    ),
    ModelSpec(
        "image_only_imagewise",
        "NYU image-wise image-only model (ResNet-22, one view)",
        "image-only, per image",
        _image_breast(1),
        nested_key="model",
        original_names=("ImageOnly__ModeImage_weights.p",),
    ),
    ModelSpec(
        "image_heatmaps_imagewise",
        "NYU image-wise image+heatmaps model (ResNet-22, one view)",
        "image+heatmaps, per image",
        _image_breast(3),
        nested_key="model",
        original_names=("ImageHeatmaps__ModeImage_weights.p",),
    ),
    ModelSpec(
        "density_histogram",
        "NYU density histogram model",
        "histogram",
        _density_histogram,
        original_names=("BreastDensity_BaselineHistogramModel/model.p",),
    ),
    ModelSpec(
        "density_cnn",
        "NYU density CNN (BaselineBreastModel)",
        "CNN",
        _density_cnn,
        original_names=("BreastDensity_BaselineBreastModel/model.p",),
    ),
)
MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in _SPECS}
# The exam-level cancer models (four views in, one prediction per breast) and the density models.
CANCER_MODELS: tuple[str, ...] = ("image_only", "image_heatmaps")
DENSITY_MODELS: tuple[str, ...] = ("density_histogram", "density_cnn")
# The image-wise cancer models (one prediction per image). Opt-in: the image+heatmaps one needs
# heatmaps on grids of its own, as costly again as the exam's.
IMAGEWISE_MODELS: tuple[str, ...] = ("image_only_imagewise", "image_heatmaps_imagewise")
# Models that need the patch model's heatmaps (it runs whenever one of them is selected).
HEATMAP_MODELS: tuple[str, ...] = ("image_heatmaps", "image_heatmaps_imagewise")
# The default selection: what runs when no model is named (worker, predict, demo --full).
SELECTABLE: tuple[str, ...] = CANCER_MODELS + DENSITY_MODELS
# Every name a selection may hold.
KNOWN_SELECTIONS: tuple[str, ...] = SELECTABLE + IMAGEWISE_MODELS


def spec(name: str) -> ModelSpec:
    return MODELS[name]


def check_selection(names: Iterable[str]) -> tuple[str, ...]:
    """The selection as a tuple (the default selection when empty); ValueError names an
    unknown model."""
    chosen = tuple(names) or SELECTABLE
    for name in chosen:
        if name not in KNOWN_SELECTIONS:
            raise ValueError(f"unknown model {name!r} (known: {', '.join(KNOWN_SELECTIONS)})")
    return chosen


def needs_four_views(names: Iterable[str]) -> bool:
    """Whether the selection holds an exam-level model (the image-wise ones take any views)."""
    return any(name not in IMAGEWISE_MODELS for name in check_selection(names))

"""Loading the original NYU weight files, checking them, and saying where they came from.

The files are read with ``torch.load(weights_only=True)`` (no pickle code execution), cast to
float32, and loaded strictly: the first missing, unexpected or mis-shaped key is named in
the error. Each model's legacy key spelling is mapped by the registry (the patch model's old
torchvision ``norm.1``); missing ``num_batches_tracked`` entries are accepted, as PyTorch
itself accepts them.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from mammonode.pipeline.registry import CANCER_MODELS, IMAGEWISE_MODELS, ModelSpec, spec

TEST_MARKER = "TEST_WEIGHTS"


class WeightsError(RuntimeError):
    """A weight file is missing, unreadable, or does not fit the architecture."""


@dataclass(frozen=True)
class ModelProvenance:
    file: str
    sha256: str
    verified: bool
    test_weights: bool

    def as_dict(self) -> dict:
        return asdict(self)


def sha256_of(path: Path) -> str:
    stat = path.stat()
    return _sha256_cached(str(path), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=64)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_test_dir(weights_dir: Path) -> bool:
    return (weights_dir / TEST_MARKER).exists()


def model_file(weights_dir: Path, name: str) -> Path:
    return weights_dir / spec(name).file


def provenance(weights_dir: Path, name: str) -> ModelProvenance:
    path = model_file(weights_dir, name)
    digest = sha256_of(path)
    expected = spec(name).manifest.sha256
    verified = bool(expected) and digest == expected
    # A file whose checksum is the official one is not a test weight, whatever directory holds it.
    return ModelProvenance(
        file=str(path), sha256=digest, verified=verified, test_weights=is_test_dir(weights_dir) and not verified
    )


def read_state_dict(path: Path, model: ModelSpec) -> dict[str, torch.Tensor]:
    """The file's tensors (float32) under this project's key spelling."""
    if not path.exists():
        raise WeightsError(f"weights file not found: {path}")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        raise WeightsError(f"cannot read weights file {path}: {exc}") from exc
    if model.nested_key is not None:
        if not isinstance(loaded, dict) or model.nested_key not in loaded:
            raise WeightsError(f"{path}: expected a dict with key {model.nested_key!r}")
        loaded = loaded[model.nested_key]
    if not isinstance(loaded, dict):
        raise WeightsError(f"{path}: expected a state_dict, found {type(loaded).__name__}")
    return {k: v.float() if v.is_floating_point() else v for k, v in model.from_original(dict(loaded)).items()}


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> nn.Module:
    """Load ``state`` into ``model``; name the first mismatch if it does not fit exactly."""
    expected = model.state_dict()
    for key, target in expected.items():
        if key not in state:
            if key.endswith("num_batches_tracked"):
                state[key] = target.clone()
                continue
            raise WeightsError(f"{path}: missing key {key!r} (expected shape {tuple(target.shape)})")
        if tuple(state[key].shape) != tuple(target.shape):
            raise WeightsError(
                f"{path}: key {key!r} has shape {tuple(state[key].shape)}, expected {tuple(target.shape)}"
            )
    for key in state:
        if key not in expected:
            raise WeightsError(f"{path}: unexpected key {key!r}")
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_model(name: str, weights_dir: Path) -> nn.Module:
    """The named model with its weights, in eval mode; WeightsError names what does not fit."""
    model = spec(name)
    path = model_file(weights_dir, name)
    loaded = load_strict(model.build(), read_state_dict(path, model), path)
    if name == "patch":
        from mammonode.pipeline.models.densenet import fold_batch_norms, grey_input_densenet

        loaded = fold_batch_norms(grey_input_densenet(loaded))
    elif name in CANCER_MODELS + IMAGEWISE_MODELS:
        from mammonode.pipeline.models import resnet22

        loaded = resnet22.fold_batch_norms(loaded)
    return loaded


def default_weights_dir() -> Path:
    env = os.environ.get("MAMMONODE_WEIGHTS_DIR")
    return Path(env) if env else Path("/var/lib/mammonode/weights")

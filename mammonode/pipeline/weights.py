"""Loading the original NYU weight files, checking them, and saying where they came from.

The files are read with ``torch.load(weights_only=True)`` (no pickle code execution), cast to
float32, and loaded strictly: the first missing, unexpected or mis-shaped key is named in
the error. Old torchvision DenseNet spelling (``norm.1``) and missing
``num_batches_tracked`` entries are accepted, as PyTorch itself accepts them.
"""

from __future__ import annotations

import hashlib
import os
import re
import tomllib
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from mammonode.pipeline.names import ALL_MODELS, MODEL_NAMES

TEST_MARKER = "TEST_WEIGHTS"
__all__ = ["ALL_MODELS", "MODEL_NAMES", "TEST_MARKER"]


class WeightsError(RuntimeError):
    """A weight file is missing, unreadable, or does not fit the architecture."""


@dataclass(frozen=True)
class ManifestEntry:
    name: str
    file: str
    architecture: str
    role: str
    origin: str
    license: str
    sha256: str


@dataclass(frozen=True)
class ModelProvenance:
    file: str
    sha256: str
    verified: bool
    test_weights: bool

    def as_dict(self) -> dict:
        return asdict(self)


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
    return weights_dir / manifest()[name].file


def provenance(weights_dir: Path, name: str) -> ModelProvenance:
    path = model_file(weights_dir, name)
    digest = sha256_of(path)
    expected = manifest()[name].sha256
    verified = bool(expected) and digest == expected
    # A file whose checksum is the official one is not a test weight, whatever directory holds it.
    return ModelProvenance(
        file=str(path), sha256=digest, verified=verified, test_weights=is_test_dir(weights_dir) and not verified
    )


_OLD_DENSENET = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12]\.(?:weight|bias|running_mean|running_var))$")


def _normalise_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        match = _OLD_DENSENET.match(key)
        if match:
            key = match.group(1) + match.group(2)
        out[key] = value
    return out


def read_state_dict(path: Path, nested_key: str | None = None) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise WeightsError(f"weights file not found: {path}")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        raise WeightsError(f"cannot read weights file {path}: {exc}") from exc
    if nested_key is not None:
        if not isinstance(loaded, dict) or nested_key not in loaded:
            raise WeightsError(f"{path}: expected a dict with key {nested_key!r}")
        loaded = loaded[nested_key]
    if not isinstance(loaded, dict):
        raise WeightsError(f"{path}: expected a state_dict, found {type(loaded).__name__}")
    return {k: v.float() if v.is_floating_point() else v for k, v in _normalise_keys(dict(loaded)).items()}


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


def default_weights_dir() -> Path:
    env = os.environ.get("MAMMONODE_WEIGHTS_DIR")
    return Path(env) if env else Path("/var/lib/mammonode/weights")

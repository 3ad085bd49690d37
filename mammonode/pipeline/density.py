"""BI-RADS breast density from NYU's breast_density_classifier models.

Both models take the four views facing right, each standardised on its own (float32, as
the original). The CNN was trained on 2600x2000 images; an image of another size is
scaled, keeping its aspect ratio, to fit 2600x2000 (OpenCV area interpolation when
shrinking, bicubic when enlarging) and zero-padded at the bottom and on the right, which is
the background side of a view facing right, before standardisation. An image already
2600x2000 passes through unchanged. The histogram model's 50-bin normalised histogram does
not depend on image size, so it uses each view at its own size.
"""

from __future__ import annotations

from collections.abc import Mapping

import cv2
import numpy as np
import torch

from mammonode.exam.views import VIEWS
from mammonode.pipeline import standardise

CNN_INPUT = (2600, 2000)
CATEGORIES = ("a", "b", "c", "d")
HISTOGRAM_BINS = 50


def conform(image: np.ndarray, size: tuple[int, int] = CNN_INPUT) -> np.ndarray:
    if image.shape == size:
        return image
    scale = min(size[0] / image.shape[0], size[1] / image.shape[1])
    height = min(size[0], round(image.shape[0] * scale))
    width = min(size[1], round(image.shape[1] * scale))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    resized = cv2.resize(np.ascontiguousarray(image, dtype=np.float32), (width, height), interpolation=interpolation)
    out = np.zeros(size, dtype=np.float32)
    out[:height, :width] = np.clip(resized, 0, None)
    return out


def histogram_features(facing_right: Mapping[str, np.ndarray], bins: int = HISTOGRAM_BINS) -> np.ndarray:
    features = []
    for view in VIEWS:
        counts, _ = np.histogram(standardise.for_density(facing_right[view]), bins=bins, density=False)
        features.append(counts / counts.sum())
    return np.concatenate(features)[None]


def histogram_probabilities(model: torch.nn.Module, facing_right: Mapping[str, np.ndarray]) -> list[float]:
    x = torch.Tensor(histogram_features(facing_right))
    with torch.inference_mode():
        return [float(p) for p in model(x)[0]]


def cnn_probabilities(
    model: torch.nn.Module, facing_right: Mapping[str, np.ndarray], device: torch.device | None = None
) -> list[float]:
    device = device or next(model.parameters()).device
    x = {
        view: torch.from_numpy(standardise.for_density(conform(facing_right[view])))[None, None].to(device)
        for view in VIEWS
    }
    with torch.inference_mode():
        return [float(p) for p in model(x)[0].cpu()]


def category(probabilities: list[float]) -> str:
    return CATEGORIES[int(np.argmax(probabilities))]

"""Cancer predictions of the view-split classifiers, averaged over augmented epochs.

Windows for all epochs are drawn first (the random stream is the original's: per epoch, per
view in L-CC, R-CC, L-MLO, R-MLO order), then the epochs go through the network in batches.
The input channels are laid out as the original lays them (image alone, or image + benign
+ malignant heatmaps resized together), because OpenCV's bicubic resize does not give
bit-identical channels for different channel counts.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from mammonode.exam.views import VIEWS, angle
from mammonode.pipeline import standardise
from mammonode.pipeline.augment import Window, cut, sample_window
from mammonode.pipeline.inference import as_input, infer, prepare_model
from mammonode.pipeline.models.resnet22 import LABELS, SplitBreastModel
from mammonode.pipeline.progress import Progress

MAX_CROP_NOISE = (100, 100)
MAX_CROP_SIZE_NOISE = 100


def draw_windows(
    shapes: Mapping[str, tuple[int, int]],
    centers: Mapping[str, tuple[int, int]],
    epochs: int,
    seed: int,
    augmentation: bool,
) -> list[dict[str, Window]]:
    rng = np.random.RandomState(seed)
    noise, size_noise = (MAX_CROP_NOISE, MAX_CROP_SIZE_NOISE) if augmentation else ((0, 0), 0)
    windows = []
    for _ in range(epochs):
        epoch = {}
        for view in VIEWS:
            if augmentation:
                rng.randint(low=0, high=1)  # image index: one image per view
            epoch[view] = sample_window(shapes[view], angle(view), centers[view], rng, noise, size_noise)
        windows.append(epoch)
    return windows


def model_source(image: np.ndarray, heatmaps: np.ndarray | None) -> np.ndarray:
    """What the epochs' windows are cut from: the image (H, W), or the image and its heatmaps
    stacked (H, W, 3) once per view rather than once per epoch."""
    return image if heatmaps is None else np.dstack([image, heatmaps])


def model_input(source: np.ndarray, window: Window, view: str) -> np.ndarray:
    """(H, W, C) float32 input for one window of a :func:`model_source`: channels last, as
    the resize gives them and as the network runs on a CPU, so :func:`as_batch` copies
    nothing (a channels-first array cost two transposing copies of the 2677x1942x3 window)."""
    if source.ndim == 2:
        return standardise.for_classifier(cut(source, window, angle(view)))[:, :, None]
    joint = cut(source, window, angle(view))
    if np.may_share_memory(joint, source):  # a window of the input size, taken as it is
        joint = joint.copy()
    joint[:, :, 0] = standardise.for_classifier(joint[:, :, 0])
    return joint


def as_batch(inputs: list[np.ndarray]) -> torch.Tensor:
    """(N, C, H, W) tensor over :func:`model_input` arrays, in channels-last memory; one
    input is taken as it is, more are stacked."""
    stacked = inputs[0][None] if len(inputs) == 1 else np.stack(inputs)
    return torch.from_numpy(stacked).permute(0, 3, 1, 2)


def predict(
    model: SplitBreastModel,
    images: Mapping[str, np.ndarray],
    heatmaps: Mapping[str, np.ndarray] | None,
    centers: Mapping[str, tuple[int, int]],
    epochs: int,
    seed: int,
    augmentation: bool,
    batch_size: int = 1,
    device: torch.device | None = None,
    precision: str = "fp32",
    progress: Progress | None = None,
) -> dict[str, float]:
    """``images``: cropped views facing right; ``heatmaps``: per view (H, W, 2) benign, malignant.

    On CPU the network runs channels-last (oneDNN's faster layout) one epoch at a time: a
    2677x1942 input already fills the caches, and bigger batches only add memory traffic."""
    device = device or next(model.parameters()).device
    channels_last = device.type == "cpu"
    model = prepare_model(model, channels_last)
    epochs = epochs if augmentation else 1
    windows = draw_windows({v: images[v].shape for v in VIEWS}, centers, epochs, seed, augmentation)
    sources = {v: model_source(images[v], heatmaps[v] if heatmaps is not None else None) for v in VIEWS}
    per_epoch = []
    for begin in range(0, epochs, batch_size):
        chunk = windows[begin : begin + batch_size]
        batch = {}
        for view in VIEWS:
            inputs = as_batch([model_input(sources[view], w[view], view) for w in chunk])
            batch[view] = as_input(inputs, device, channels_last)
        out = infer(model, batch, device, precision)
        # Each label's probability is the mean of its CC and MLO heads.
        per_epoch.append(((out["CC"].float() + out["MLO"].float()) / 2).cpu().numpy())
        if progress is not None:
            progress.advance(len(chunk))
    mean = np.concatenate(per_epoch).astype(np.float64).mean(axis=0)
    return {label: float(value) for label, value in zip(LABELS, mean)}

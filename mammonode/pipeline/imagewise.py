"""NYU's image-wise pipeline (``run_single.sh``): heatmaps and cancer predictions per image.

Crop and best centre are the exam pipeline's. The rest follows the single-image scripts,
whose conventions differ from the exam pipeline's, and are reproduced as they are:

- stride lists: Python's ``random`` is seeded afresh for each image (the exam seeds once
  and draws the four views from one stream), so each grid is the first draw after ``seed``;
- heatmaps: the producer never flips (it is handed "CC"/"MLO", not the full view), so the
  patch grid runs over the cropped image as acquired, right views facing left and anchored
  at their left edge; the classifier flips image and heatmaps together afterwards;
- augmentation: a fresh ``numpy.random.RandomState(seed)`` per image, and no image-index
  draw per epoch (the exam draws one).

Where a view's producer frame coincides with the exam's (the left views), each patch at a
place the exam's grid also has is the exam's, not classified again: all of L-CC's (same
seed, same grid), about a third of L-MLO's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from mammonode.exam.orientation import Frame, Orientation
from mammonode.exam.views import VIEWS, angle
from mammonode.pipeline.augment import Window, sample_window
from mammonode.pipeline.classify import MAX_CROP_NOISE, MAX_CROP_SIZE_NOISE, as_batch, model_input, model_source
from mammonode.pipeline.heatmaps import (
    Heatmaps,
    HeatmapStats,
    PatchGrid,
    PatchRunner,
    PatchValues,
    compute_heatmaps,
    make_grids,
)
from mammonode.pipeline.inference import as_input, infer, prepare_model
from mammonode.pipeline.models.imagewise import LABELS, SingleImageBreastModel
from mammonode.pipeline.progress import Progress

PRODUCER_FRAME = Frame.ACQUIRED  # where the single-image heatmap producer sees each crop
STAGE = "imagewise_heatmaps"


@dataclass
class ImagewiseHeatmaps:
    """One view's image-wise heatmaps in the classifier's frame (the crop facing right), and
    the grid they came from in the producer's frame (the crop as acquired)."""

    benign: np.ndarray
    malignant: np.ndarray
    grid: PatchGrid
    patches_from_exam: int = 0  # patches the exam had classified at the same place, same frame

    @property
    def reused(self) -> bool:
        """Every patch came from the exam (same frame, same grid): nothing was classified."""
        return self.patches_from_exam == len(self.grid.top_left)

    @property
    def stride_lists(self) -> dict[str, list[int]]:
        return {"width": self.grid.width_strides, "length": self.grid.length_strides}

    @property
    def stacked(self) -> np.ndarray:
        """(H, W, 2): benign, malignant, the classifier's auxiliary channels in its order."""
        return np.dstack([self.benign, self.malignant])


def grid(shape: tuple[int, int], seed: int) -> PatchGrid:
    """One image's grid: the first draws after its own ``random.seed(seed)``."""
    return make_grids([shape], seed=seed)[0]


def _known(orientation: Orientation, exam: tuple[PatchGrid, Heatmaps] | None) -> PatchValues | None:
    """The exam's classified patches of this view where the producer sees the crop as the
    exam does (facing right): a patch at the same place on both grids is the same input."""
    if exam is None or orientation.flips(Frame.FACING_RIGHT, PRODUCER_FRAME):
        return None
    return exam[1].patches


def compute(
    crops: Mapping[str, np.ndarray],
    orientations: Mapping[str, Orientation],
    run: PatchRunner,
    seed: int,
    batch_size: int = 8,
    progress: Progress | None = None,
    exam: Mapping[str, tuple[PatchGrid, Heatmaps]] | None = None,
) -> tuple[dict[str, ImagewiseHeatmaps], HeatmapStats]:
    """Image-wise heatmaps of each cropped view (``crops`` facing right); ``exam``: the exam's
    grids and heatmaps, whose patches are reused wherever the two grids share one."""
    views = [v for v in VIEWS if v in crops]
    grids = {view: grid(crops[view].shape, seed) for view in views}
    known = [_known(orientations[v], (exam or {}).get(v)) for v in views]
    seen = [orientations[v].convert(crops[v], Frame.FACING_RIGHT, PRODUCER_FRAME) for v in views]
    maps, stats = compute_heatmaps(seen, [grids[v] for v in views], run, batch_size, progress, STAGE, known)
    out = {}
    for view, m, k in zip(views, maps, known):
        o = orientations[view]
        shared = 0 if k is None else int(k.lookup(m.patches.corners)[0].sum())
        out[view] = ImagewiseHeatmaps(
            benign=np.ascontiguousarray(o.convert(m.benign, PRODUCER_FRAME, Frame.FACING_RIGHT)),
            malignant=np.ascontiguousarray(o.convert(m.malignant, PRODUCER_FRAME, Frame.FACING_RIGHT)),
            grid=grids[view],
            patches_from_exam=shared,
        )
    return out, stats


def draw_windows(
    shape: tuple[int, int], view: str, center: tuple[int, int], epochs: int, seed: int, augmentation: bool
) -> list[Window]:
    """One image's windows for every epoch, from its own random stream."""
    rng = np.random.RandomState(seed)
    noise, size_noise = (MAX_CROP_NOISE, MAX_CROP_SIZE_NOISE) if augmentation else ((0, 0), 0)
    return [sample_window(shape, angle(view), center, rng, noise, size_noise) for _ in range(epochs)]


def predict(
    model: SingleImageBreastModel,
    view: str,
    image: np.ndarray,
    heatmaps: np.ndarray | None,
    center: tuple[int, int],
    epochs: int,
    seed: int,
    augmentation: bool,
    batch_size: int = 1,
    device: torch.device | None = None,
    precision: str = "fp32",
    progress: Progress | None = None,
) -> dict[str, float]:
    """Benign and malignant probability of one view: ``image`` is its crop facing right,
    ``heatmaps`` (H, W, 2) benign and malignant in the same frame, or None (image only)."""
    device = device or next(model.parameters()).device
    channels_last = device.type == "cpu"
    model = prepare_model(model, channels_last)
    epochs = epochs if augmentation else 1
    windows = draw_windows(image.shape, view, center, epochs, seed, augmentation)
    source = model_source(image, heatmaps)
    per_epoch = []
    for begin in range(0, epochs, batch_size):
        chunk = windows[begin : begin + batch_size]
        inputs = as_batch([model_input(source, w, view) for w in chunk])
        out = infer(model, as_input(inputs, device, channels_last), device, precision)
        per_epoch.append(out.float().cpu().numpy())
        if progress is not None:
            progress.advance(len(chunk))
    mean = np.concatenate(per_epoch).astype(np.float64).mean(axis=0)
    return {label: float(value) for label, value in zip(LABELS, mean)}

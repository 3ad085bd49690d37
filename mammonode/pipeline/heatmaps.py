"""Benign and malignant heatmaps from the patch classifier (NYU's run_producer step).

Each cropped view (facing right) is standardised once and cut into 256-pixel patches on a
grid whose strides come from Python's ``random`` exactly as the original draws them; the
patch classifier's softmax for each patch is averaged over every pixel the patch covers.
Differences from the original that leave the numbers unchanged: patches of all four views
are gathered by array indexing and classified in shared batches, all-background patches
(identical by construction) are classified once, the grey patch goes through a conv0 whose
weights are summed over the three identical input channels, the model runs with its batch
norms folded and its transitions pooling before they convolve (models/densenet.py), and the
averaging uses a 2-D difference array instead of adding every patch into the map. A patch
already classified on another grid over the same image in the same frame (``known``) is not
classified again.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from mammonode.pipeline import standardise
from mammonode.pipeline.images import ImageInputError
from mammonode.pipeline.inference import as_input, compile_fixed, infer, prepare_model
from mammonode.pipeline.progress import Progress

PATCH_SIZE = 256
STRIDE_FIXED = 70
# Output column of the patch classifier that each heatmap shows (the original's heatmap_type).
MALIGNANT_CLASS = 0
BENIGN_CLASS = 1


def stride_list(length: int, rng: random.Random, patch: int = PATCH_SIZE, stride: int = STRIDE_FIXED) -> list[int]:
    """Strides along one axis: as many ``stride`` steps as fit, then the remainder spread by
    making randomly chosen steps one pixel shorter so the last patch ends at the edge.
    (The original's ``more_patches`` has no effect with a fixed stride.)"""
    if length < patch:
        raise ImageInputError(f"cropped image side {length} is smaller than the {patch}-pixel patch")
    steps = (length - patch) // stride
    left_over = (length - patch) % stride
    if left_over == 0:
        return [stride] * steps
    steps += 1
    overlap = stride - left_over
    strides = [stride - overlap // steps] * steps
    for i in rng.sample(range(steps), overlap % steps):
        strides[i] -= 1
    return strides


def origins(strides: Sequence[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(strides)]).astype(np.int64)


@dataclass
class PatchGrid:
    """Patch origins of one view, rows varying fastest (the original's patch order)."""

    shape: tuple[int, int]
    width_strides: list[int]  # along rows (first axis)
    length_strides: list[int]  # along columns

    @property
    def top_left(self) -> np.ndarray:
        ys = origins(self.width_strides)
        xs = origins(self.length_strides)
        grid = np.stack(np.meshgrid(ys, xs, indexing="xy"), axis=-1)  # (len(xs), len(ys), 2)
        return grid.reshape(-1, 2)


def make_grids(shapes: Sequence[tuple[int, int]], seed: int = 0) -> list[PatchGrid]:
    """Grids of all views in order, from one stream seeded as the original seeds it."""
    rng = random.Random(seed)
    grids = []
    for shape in shapes:
        width = stride_list(shape[0], rng)
        length = stride_list(shape[1], rng)
        grids.append(PatchGrid(shape=tuple(shape), width_strides=width, length_strides=length))
    return grids


def _background_patches(raw: np.ndarray, corners: np.ndarray) -> np.ndarray:
    """Which patches hold only zero pixels (a summed-area table of the non-zero mask)."""
    nonzero = np.zeros((raw.shape[0] + 1, raw.shape[1] + 1), dtype=np.int64)
    nonzero[1:, 1:] = (raw != 0).cumsum(0).cumsum(1)
    y0, x0 = corners[:, 0], corners[:, 1]
    y1, x1 = y0 + PATCH_SIZE, x0 + PATCH_SIZE
    counts = nonzero[y1, x1] - nonzero[y0, x1] - nonzero[y1, x0] + nonzero[y0, x0]
    return counts == 0


def _gather(image: torch.Tensor, corners: np.ndarray) -> torch.Tensor:
    """(N, 1, 256, 256) patches at ``corners``, gathered where ``image`` is (on a GPU: no
    patch crosses from the host)."""
    offsets = torch.arange(PATCH_SIZE, device=image.device)
    corners_there = torch.as_tensor(corners, device=image.device)
    rows = corners_there[:, 0, None] + offsets
    cols = corners_there[:, 1, None] + offsets
    return image[rows[:, :, None], cols[:, None, :]].unsqueeze(1)


def accumulate(shape: tuple[int, int], corners: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Mean of ``values`` over the patches covering each pixel."""
    height, width = shape
    total = np.zeros((height + 1, width + 1), dtype=np.float64)
    count = np.zeros((height + 1, width + 1), dtype=np.float64)
    y0, x0 = corners[:, 0], corners[:, 1]
    y1, x1 = y0 + PATCH_SIZE, x0 + PATCH_SIZE
    for arr, v in ((total, values.astype(np.float64)), (count, np.ones(len(values)))):
        np.add.at(arr, (y0, x0), v)
        np.add.at(arr, (y0, x1), -v)
        np.add.at(arr, (y1, x0), -v)
        np.add.at(arr, (y1, x1), v)
    total = total.cumsum(0).cumsum(1)[:height, :width]
    count = np.rint(count.cumsum(0).cumsum(1)[:height, :width])
    return (total / count).astype(np.float32)


@dataclass
class PatchValues:
    """The patch classifier's softmax (N, 4) for patches at ``corners`` (N, 2: top, left)."""

    corners: np.ndarray
    probabilities: np.ndarray

    def lookup(self, corners: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Which of ``corners`` are known here, and their values (rows of the known ones)."""
        if not len(self.corners):
            return np.zeros(len(corners), dtype=bool), self.probabilities[:0]
        width = int(max(self.corners[:, 1].max(initial=0), corners[:, 1].max(initial=0))) + 1
        mine = self.corners[:, 0] * width + self.corners[:, 1]
        theirs = corners[:, 0] * width + corners[:, 1]
        order = np.argsort(mine)
        at = np.clip(np.searchsorted(mine, theirs, sorter=order), 0, len(mine) - 1)
        found = mine[order[at]] == theirs
        return found, self.probabilities[order[at[found]]]


@dataclass
class Heatmaps:
    benign: np.ndarray
    malignant: np.ndarray
    patches: PatchValues | None = None


@dataclass
class HeatmapStats:
    patches: int
    classified: int
    seconds_model: float


PatchRunner = Callable[[torch.Tensor], torch.Tensor]


def patch_runner(
    model: nn.Module,
    channels_last: bool = True,
    precision: str = "fp32",
    compiled_batch: int = 0,
    front_batch: int = 0,
) -> PatchRunner:
    """Softmax of the patch model for a batch of grey patches. With ``compiled_batch`` the
    model is compiled for batches of that size (pipeline.compile), and a smaller last
    batch is padded to it, so one compiled graph serves every batch. ``front_batch``: the
    uncompiled model runs its high-resolution layers that many patches at a time
    (:meth:`DenseNet121.forward`)."""
    device = next(model.parameters()).device
    model = prepare_model(model, channels_last)
    if front_batch and not compiled_batch:
        model = functools.partial(model, front_batch=front_batch)
    if compiled_batch:
        example = torch.zeros((compiled_batch, 1, PATCH_SIZE, PATCH_SIZE))
        compiled = compile_fixed(model, as_input(example, device, channels_last), device, precision)
        if compiled is None:
            compiled_batch = 0
        else:
            model = compiled

    def run(batch: torch.Tensor) -> torch.Tensor:
        count = len(batch)
        if 0 < count < compiled_batch:
            batch = torch.cat([batch, batch.new_zeros((compiled_batch - count, *batch.shape[1:]))])
        logits = infer(model, as_input(batch, device, channels_last), device, precision)[:count]
        with torch.inference_mode():
            return torch.softmax(logits.float(), dim=1).cpu()

    run.device = device  # where compute_heatmaps keeps the crops and gathers the patches
    return run


def compute_heatmaps(
    crops: Sequence[np.ndarray],
    grids: Sequence[PatchGrid],
    run: PatchRunner,
    batch_size: int = 64,
    progress: Progress | None = None,
    stage: str = "heatmaps",
    known: Sequence[PatchValues | None] | None = None,
) -> tuple[list[Heatmaps], HeatmapStats]:
    """Heatmaps for each cropped image on its grid, in the image's own frame (the exam's
    crops face right); ``progress`` hears of every classified batch, as ``stage``.
    ``known[i]``: patches of image i already classified in this frame, taken as they are."""
    import time

    device = getattr(run, "device", torch.device("cpu"))  # the runner's, where it says
    standardised, corner_lists, todo = [], [], []
    probabilities = [np.zeros((len(g.top_left), 4), dtype=np.float32) for g in grids]
    for index, (crop, grid) in enumerate(zip(crops, grids)):
        if crop.shape != grid.shape:
            raise ValueError("grid does not match its image")
        corners = grid.top_left
        corner_lists.append(corners)
        standardised.append(torch.from_numpy(standardise.for_heatmaps(crop)).to(device))
        background = _background_patches(crop, corners)
        done = np.zeros(len(corners), dtype=bool)
        if known is not None and known[index] is not None:
            done, values = known[index].lookup(corners)
            probabilities[index][done] = values
        todo.append((index, corners, background, done))

    # One representative per view for its all-background patches (they all share one value
    # after standardisation, but the value differs between views): a known one if any.
    jobs: list[tuple[int, np.ndarray]] = []  # (view index, corners to classify)
    representative: list[int] = []
    for index, _corners, background, done in todo:
        keep = ~background & ~done
        first = -1
        if background.any():
            known_background = np.flatnonzero(background & done)
            first = int(known_background[0]) if len(known_background) else int(np.flatnonzero(background)[0])
            keep[first] = not done[first]
        representative.append(first)
        jobs.append((index, np.flatnonzero(keep)))

    queue_view = np.concatenate([np.full(len(chosen), index) for index, chosen in jobs])
    queue_patch = np.concatenate([chosen for _, chosen in jobs])
    if progress is not None:
        progress.stage(stage, total=len(queue_view), unit="patches")
    start = time.perf_counter()
    for begin in range(0, len(queue_view), batch_size):
        views = queue_view[begin : begin + batch_size]
        patches = queue_patch[begin : begin + batch_size]
        present = np.unique(views)
        batch = torch.cat([_gather(standardised[v], corner_lists[v][patches[views == v]]) for v in present])
        out = run(batch).numpy()
        row = 0
        for v in present:
            chosen = patches[views == v]
            probabilities[v][chosen] = out[row : row + len(chosen)]
            row += len(chosen)
        if progress is not None:
            progress.advance(len(views))
    seconds = time.perf_counter() - start

    results = []
    for index, corners, background, _done in todo:
        probs = probabilities[index]
        if representative[index] >= 0:
            probs[background] = probs[representative[index]]
        results.append(
            Heatmaps(
                benign=accumulate(grids[index].shape, corners, probs[:, BENIGN_CLASS]),
                malignant=accumulate(grids[index].shape, corners, probs[:, MALIGNANT_CLASS]),
                patches=PatchValues(corners, probs),
            )
        )
    stats = HeatmapStats(patches=sum(len(c) for c in corner_lists), classified=len(queue_view), seconds_model=seconds)
    return results, stats

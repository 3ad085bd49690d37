"""Patches already classified on another grid over the same image are taken, not classified
again: the heatmaps come out the same, and only the patches no earlier grid had reach the
model. The patch model here is a stand-in whose output depends only on the patch, so any
patch mixed up with another would change the maps."""

from __future__ import annotations

import numpy as np
import torch

from mammonode.pipeline.heatmaps import PATCH_SIZE, compute_heatmaps, make_grids


class CountingModel:
    """Softmax of four statistics of each patch; counts the patches it is given."""

    def __init__(self) -> None:
        self.seen = 0

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        self.seen += len(batch)
        flat = batch.flatten(1).double()
        stats = torch.stack([flat.mean(1), flat.std(1), flat.amax(1), flat[:, :: PATCH_SIZE + 1].mean(1)], 1)
        return torch.softmax(stats, 1).float()


def corner_set(grid) -> set[tuple[int, int]]:
    ys = np.concatenate([[0], np.cumsum(grid.width_strides)])
    xs = np.concatenate([[0], np.cumsum(grid.length_strides)])
    return {(int(y), int(x)) for y in ys for x in xs}


def test_known_patches_are_not_classified_again_and_the_maps_are_unchanged():
    rng = np.random.default_rng(0)
    image = rng.integers(1, 4096, size=(900, 1100)).astype(np.uint16)
    image[:, 600:] = 0  # a background region: its patches share one value
    first, second = make_grids([image.shape], seed=0)[0], make_grids([image.shape], seed=7)[0]
    assert first != second

    model = CountingModel()
    [maps_first], _ = compute_heatmaps([image], [first], model)
    model.seen = 0
    [fresh], stats_fresh = compute_heatmaps([image], [second], model)
    fresh_count = model.seen
    model.seen = 0
    [reused], stats_reused = compute_heatmaps([image], [second], model, known=[maps_first.patches])

    np.testing.assert_array_equal(reused.benign, fresh.benign)
    np.testing.assert_array_equal(reused.malignant, fresh.malignant)
    shared = corner_set(first) & corner_set(second)
    background = {(y, x) for y, x in corner_set(second) if not image[y : y + PATCH_SIZE, x : x + PATCH_SIZE].any()}
    assert shared and background & shared  # the case of a known background representative
    # Fresh: every patch with tissue, plus one background representative.
    assert fresh_count == stats_fresh.classified == len(corner_set(second) - background) + 1
    # With the first grid's patches known: only the tissue patches it did not have.
    assert model.seen == stats_reused.classified == len(corner_set(second) - background - shared)

    model.seen = 0
    [same], _ = compute_heatmaps([image], [first], model, known=[maps_first.patches])
    assert model.seen == 0
    np.testing.assert_array_equal(same.benign, maps_first.benign)

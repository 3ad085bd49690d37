"""Optimal window centre of a cropped view (NYU's get_optimal_centers step).

The classifier looks at a fixed window per view angle. Its centre is pushed against the
breast's nipple side: for CC views the window's right edge sits at the rightmost mask point;
for MLO views its bottom-right corner sits at the bottom-rightmost point. Among the centres
left, the one whose window holds the most non-zero pixels wins, ties going to the centre
nearest the image centre. All coordinates are in the cropped image facing right.
"""

from __future__ import annotations

import numpy as np

from mammonode.pipeline.crop import CropInfo

INPUT_SIZE = {"CC": (2677, 1942), "MLO": (2974, 1748)}


def _candidate_range(com: np.ndarray, dims: np.ndarray, window: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    half = window // 2
    low = half.copy()
    high = dims - (window - half)
    for axis in range(2):
        if low[axis] >= high[axis]:
            low[axis] = high[axis] = com[axis]
    return low, high + 1  # high exclusive


def _window_sums(binary: np.ndarray, centres: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Non-zero pixel count of the window around each centre; windows that stick out at the
    top/left are shifted in, windows that stick out at the bottom/right are clipped."""
    dims = np.array(binary.shape)
    half = window // 2
    tl = centres - half
    shift = np.clip(-tl, 0, None)
    tl = np.clip(tl, 0, None)
    br = np.minimum(centres + (window - half) + shift, dims)
    integral = np.zeros((dims[0] + 1, dims[1] + 1), dtype=np.int64)
    integral[1:, 1:] = binary.cumsum(0).cumsum(1)
    return (
        integral[br[:, 0], br[:, 1]]
        - integral[tl[:, 0], br[:, 1]]
        - integral[br[:, 0], tl[:, 1]]
        + integral[tl[:, 0], tl[:, 1]]
    )


def best_center(cropped_facing_right: np.ndarray, angle: str, crop: CropInfo) -> tuple[int, int]:
    image = cropped_facing_right
    window = np.array(INPUT_SIZE[angle])
    dims = np.array(image.shape)
    com = dims // 2
    low, high = _candidate_range(com, dims, window)
    half = window // 2
    rightmost_x = crop.rightmost_points[1]
    if angle == "CC":
        low = low.copy()
        high = high.copy()
        low[1], high[1] = rightmost_x - half[1] - 1, rightmost_x - half[1]
    else:
        bottom_y = crop.bottommost_points[0]
        rows = np.flatnonzero(np.any(image[:, -window[1] :] != 0, axis=1))
        if rows.size:
            bottom_y = min(int(rows[-1]), bottom_y)
        high = np.array([bottom_y, rightmost_x]) - half
        low = high - 1
    ys = np.arange(low[0], high[0])
    xs = np.arange(low[1], high[1])
    centres = np.stack(np.meshgrid(ys, xs, indexing="ij"), axis=-1).reshape(-1, 2)
    if len(centres) == 1:
        return int(low[0]), int(low[1])
    sums = _window_sums(image > 0, centres, window)
    best = centres[sums == sums.max()]
    if len(best) > 1:
        best = best[[np.argmin(((best - com) ** 2).sum(1))]]
    return int(best[0][0]), int(best[0][1])

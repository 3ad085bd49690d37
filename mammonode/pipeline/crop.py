"""Breast-region crop, as NYU's crop_mammogram step computes it.

Non-zero mask -> erosion (100 iterations of the 4-connected cross, pixels outside the image
count as background) -> largest 4-connected component -> dilation (100 iterations) ->
bounding box, with a 50-pixel buffer at top and bottom and on the nipple side only. The
extra outputs (rightmost and bottommost mask points, in the cropped frame after flipping the
view to face right) steer the optimal-centre search. The morphology runs in OpenCV, which
gives the same masks as the original's scipy.ndimage calls in a fraction of the time.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from mammonode.pipeline.images import ImageInputError

_CROSS = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))


@dataclass(frozen=True)
class CropInfo:
    window_location: tuple[int, int, int, int]  # top, bottom, left, right in the stored image
    rightmost_points: tuple[tuple[int, int], int]  # ((y0, y1), x)
    bottommost_points: tuple[int, tuple[int, int]]  # (y, (x0, x1))
    distance_from_starting_side: int

    def as_dict(self) -> dict:
        (y0, y1), x = self.rightmost_points
        y, (x0, x1) = self.bottommost_points
        return {
            "window_location": list(self.window_location),
            "rightmost_points": [[y0, y1], x],
            "bottommost_points": [y, [x0, x1]],
            "distance_from_starting_side": self.distance_from_starting_side,
        }


def largest_component(mask: np.ndarray) -> np.ndarray:
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=4)
    if count < 2:
        raise ImageInputError("no breast tissue found: the image is empty after erosion")
    areas = stats[1:, cv2.CC_STAT_AREA]
    candidates = np.flatnonzero(areas == areas.max()) + 1
    if len(candidates) > 1:
        # Ties go to the component met first in raster order, as with scipy's labels.
        flat = labels.ravel()
        candidates = sorted(candidates, key=lambda lab: int(np.argmax(flat == lab)))
    return labels == candidates[0]


def crop_breast(
    image: np.ndarray, facing_right: bool, iterations: int = 100, buffer: int = 50, rightmost_from_ratio: float = 1 / 3
) -> CropInfo:
    """Crop window of ``image`` (as acquired); ``facing_right`` for left views."""
    height, width = image.shape
    mask = (image > 0).astype(np.uint8)
    mask = cv2.erode(mask, _CROSS, iterations=iterations, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    largest = largest_component(mask).astype(np.uint8)
    largest = cv2.dilate(largest, _CROSS, iterations=iterations, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    largest = largest.astype(bool)

    rows = np.flatnonzero(largest.any(axis=1))
    cols = np.flatnonzero(largest.any(axis=0))
    top, bottom = int(rows[0]), int(rows[-1]) + 1
    left, right = int(cols[0]), int(cols[-1]) + 1

    bottom_y = bottom - 1
    bottom_xs = np.flatnonzero(largest[bottom_y])

    if top > 0:
        top -= min(top, buffer)
    if bottom < height:
        bottom += min(height - bottom, buffer)

    # Columns of background between the image edge the breast should start from and the mask.
    distance = left if facing_right else width - right

    if facing_right:
        if right < width:
            right += min(width - right, buffer)
    elif left > 0:
        left -= min(left, buffer)

    bottom_y -= top
    if facing_right:
        bottom_xs = bottom_xs - left
    else:
        bottom_xs = (right - bottom_xs)[::-1]

    cropped = largest[top:bottom, left:right]
    ignore = int(cropped.shape[0] * rightmost_from_ratio)
    area = cropped[ignore:]
    filled_cols = np.flatnonzero(area.any(axis=0))
    x = int(filled_cols[-1] if facing_right else filled_cols[0])
    ys = np.flatnonzero(area[:, x]) + ignore
    if not facing_right:
        x = cropped.shape[1] - x

    return CropInfo(
        window_location=(top, bottom, left, right),
        rightmost_points=((int(ys[0]), int(ys[-1])), x),
        bottommost_points=(int(bottom_y), (int(bottom_xs[0]), int(bottom_xs[-1]))),
        distance_from_starting_side=int(distance),
    )

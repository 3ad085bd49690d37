"""Which way an image faces, in one place for the pipeline and the result objects.

An image is met in three frames:

- ``STORED``: the pixel columns as the file holds them;
- ``ACQUIRED``: as the modality acquired it, left views facing right (chest wall at the
  left edge) and right views facing left; NYU's cancer pipeline starts here
  (``horizontal_flip: NO``);
- ``FACING_RIGHT``: every view facing right, the frame the models were trained in.

Between any two frames an image is either the same or flipped left-right, so one
:class:`Orientation` (the view, and whether the file stores it mirrored) answers every
question with one :meth:`Orientation.convert`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np
from pydicom.dataset import Dataset

from mammonode.exam.views import laterality


class Frame(Enum):
    STORED = "stored"
    ACQUIRED = "acquired"
    FACING_RIGHT = "facing right"


def flip(image: np.ndarray) -> np.ndarray:
    """Left-right mirror image (a view, no copy)."""
    return image[:, ::-1]


@dataclass(frozen=True)
class Orientation:
    view: str  # L-CC, R-CC, L-MLO or R-MLO
    mirrored: bool = False  # the file stores the image mirrored relative to acquisition

    def _flipped_from_acquired(self, frame: Frame) -> bool:
        if frame is Frame.STORED:
            return self.mirrored
        if frame is Frame.FACING_RIGHT:
            return laterality(self.view) == "R"
        return False

    def flips(self, source: Frame, target: Frame) -> bool:
        return self._flipped_from_acquired(source) != self._flipped_from_acquired(target)

    def convert(self, image: np.ndarray, source: Frame, target: Frame) -> np.ndarray:
        """``image`` (rows x columns [x channels]) moved from ``source`` to ``target``."""
        return flip(image) if self.flips(source, target) else image

    def faces_right(self, frame: Frame) -> bool:
        """Whether the breast points right (chest wall at the left edge) in ``frame``."""
        return (laterality(self.view) == "L") != self._flipped_from_acquired(frame)


def mirrored_per_header(view: str, ds: Dataset) -> bool | None:
    """From Patient Orientation's row direction: a left view acquired facing right has its
    rows running towards Anterior, a right view towards Posterior. None when it does not say."""
    orientation = list(ds.get("PatientOrientation", []) or [])
    if not orientation or not str(orientation[0]):
        return None
    first = str(orientation[0]).strip().upper()[:1]
    if first not in ("A", "P"):
        return None
    expected = "A" if laterality(view) == "L" else "P"
    return first != expected


def mirrored_per_pixels(view: str, stored: np.ndarray) -> bool:
    """When the header does not say: the chest wall is the half with more tissue-bearing
    (non-zero) pixels."""
    half = stored.shape[1] // 2
    faces_right = np.count_nonzero(stored[:, :half]) >= np.count_nonzero(stored[:, half:])
    return faces_right != Orientation(view).faces_right(Frame.ACQUIRED)

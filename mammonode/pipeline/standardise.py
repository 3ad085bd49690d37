"""The three standardisations of the original code, each where the original does it.

They differ on purpose and must not be merged: the heatmap step standardises the whole crop
in float64 and feeds float32 patches (with a floor on the deviation); the classifiers
standardise each augmented window in float32 (with the same floor); the density models
standardise each view in float32 with no floor. Each reproduces its reference bit for bit.
"""

from __future__ import annotations

import numpy as np

STD_FLOOR = 1e-5


def for_heatmaps(image: np.ndarray) -> np.ndarray:
    """Whole crop, float64 arithmetic, float32 result (NYU run_producer)."""
    image = image.astype(np.float64)
    image -= image.mean()
    image /= max(image.std(), STD_FLOOR)
    return image.astype(np.float32)


def for_classifier(image: np.ndarray) -> np.ndarray:
    """One augmented window, float32 arithmetic (NYU run_model's standard_normalize)."""
    image = np.array(image, dtype=np.float32, copy=True)
    image -= np.mean(image)
    image /= np.maximum(np.std(image), STD_FLOOR)
    return image


def for_density(image: np.ndarray) -> np.ndarray:
    """One view, float32 arithmetic, no floor (breast_density_classifier's utils)."""
    image = np.array(image, dtype=np.float32, copy=True)
    image -= np.mean(image)
    image /= np.std(image)
    return image

"""An augmented window is the image zero-padded as the window says, cut and resized: built
from the part of the image it overlaps, it must equal padding the whole image first (the
original's way, written out here with np.pad), bit for bit, for images and image+heatmaps."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from mammonode.pipeline.augment import Window, cut, sample_window
from mammonode.pipeline.centers import INPUT_SIZE


def padded_then_cut(image: np.ndarray, window: Window, angle: str) -> np.ndarray:
    pad = [(window.pad_top, window.pad_bottom), (0, window.pad_right)] + [(0, 0)] * (image.ndim - 2)
    top, bottom, left, right = window.borders
    out = np.pad(image, pad)[top:bottom, left:right]
    height, width = INPUT_SIZE[angle]
    return out if out.shape[:2] == (height, width) else cv2.resize(out, (width, height), interpolation=cv2.INTER_CUBIC)


@pytest.mark.parametrize("channels", [0, 3])
def test_windows_drawn_for_small_and_large_images_cut_as_the_padded_image(channels):
    rng = np.random.default_rng(0)
    draws = np.random.RandomState(0)
    padded_windows = 0
    for angle, shape, center in (
        ("CC", (2100, 1500), (1000, 600)),  # smaller than the CC input: padded on every side it may be
        ("MLO", (3100, 1900), (1500, 900)),  # larger than the MLO input: a plain cut
        ("CC", (2800, 1200), (100, 1100)),  # narrow, centre near a corner
    ):
        image = rng.random(shape + ((channels,) if channels else ()), dtype=np.float32)
        for _ in range(3):
            window = sample_window(shape, angle, center, draws, (100, 100), 100)
            padded_windows += bool(window.pad_top or window.pad_bottom or window.pad_right)
            got = cut(image, window, angle)
            assert got.shape[:2] == INPUT_SIZE[angle]
            assert np.array_equal(got, padded_then_cut(image, window, angle))
    assert padded_windows >= 3  # the padded path was exercised


@pytest.mark.parametrize(
    "window",
    [
        Window(5, 7, 9, (0, 40, 0, 39)),  # reaches into every padded border
        Window(5, 7, 9, (0, 4, 0, 9)),  # only the top padding
        Window(0, 0, 9, (2, 30, 31, 39)),  # only the right padding
        Window(3, 0, 0, (4, 20, 1, 20)),  # padded image, window fully inside the image
    ],
)
def test_hand_made_windows_at_the_edges_of_the_padding(window, monkeypatch):
    top, bottom, left, right = window.borders
    monkeypatch.setitem(INPUT_SIZE, "CC", (bottom - top, right - left))
    image = np.arange(1, 30 * 30 * 3 + 1, dtype=np.float32).reshape(30, 30, 3)
    assert np.array_equal(cut(image, window, "CC"), padded_then_cut(image, window, "CC"))
    assert np.array_equal(cut(image[:, :, 0], window, "CC"), padded_then_cut(image[:, :, 0], window, "CC"))

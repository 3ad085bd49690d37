"""An augmented window is the image zero-padded as the window says, cut and resized: built
from the part of the image it overlaps, it must equal padding the whole image first (the
original's way, written out here with np.pad), bit for bit, for images and image+heatmaps; and
the classifier input made from it holds the original's channels, in channels-last memory."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from mammonode.pipeline.augment import Window, cut, sample_window
from mammonode.pipeline.centers import INPUT_SIZE
from mammonode.pipeline.classify import as_batch, model_input, model_source


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


@pytest.mark.parametrize("heatmaps", [False, True])
@pytest.mark.parametrize("augmented", [True, False])
def test_classifier_input_is_the_original_channel_layout_in_channels_last_memory(heatmaps, augmented):
    """The original stacks image and heatmaps channels-first, the image channel standardised
    (its standard_normalize: float32 mean and std); the tensor we hand the network must hold
    the same numbers, channels-last, without touching the source (a window of exactly the
    input size is a view of it)."""
    rng = np.random.default_rng(1)
    image = rng.random((2900, 2100), dtype=np.float32) * 4000
    maps = rng.random((2900, 2100, 2), dtype=np.float32) if heatmaps else None
    source = model_source(image, maps)
    before = source.copy()
    noise = ((100, 100), 100) if augmented else ((0, 0), 0)
    windows = [sample_window(image.shape, "CC", (1450, 1000), np.random.RandomState(s), *noise) for s in (0, 1)]
    got = as_batch([model_input(source, w, "L-CC") for w in windows])
    for i, window in enumerate(windows):
        joint = cut(source, window, "CC")
        joint = joint[:, :, None] if joint.ndim == 2 else joint
        first = joint[:, :, 0].astype(np.float32)  # a copy, normalised as the original does in place
        first -= np.mean(first)
        first /= np.maximum(np.std(first), 10 ** (-5))
        expected = np.concatenate([first[None], np.moveaxis(joint[:, :, 1:], 2, 0)])
        assert np.array_equal(got[i].numpy(), expected)
    assert got.shape == (2, 3 if heatmaps else 1, *INPUT_SIZE["CC"])
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert np.array_equal(source, before)

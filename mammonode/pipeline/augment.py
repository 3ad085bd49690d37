"""The classifier's input window, with the original's test-time augmentation.

Around the best centre a window of the view angle's input size is placed; images too small
for the window plus its noise margins are zero-padded (CC: top and bottom, MLO: bottom;
both: right). With augmentation the window's position moves by up to ``max_crop_noise``
pixels and each border by up to ``max_crop_size_noise`` pixels; the cut is then resized
back with OpenCV's bicubic interpolation. Random numbers come from a
``numpy.random.RandomState`` consumed in exactly the original's order (per epoch, per view:
the image index, 2 position draws when position noise is on, 4 border draws), so a seed
gives the original's windows.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from mammonode.pipeline.centers import INPUT_SIZE


@dataclass(frozen=True)
class Window:
    pad_top: int
    pad_bottom: int
    pad_right: int
    borders: tuple[int, int, int, int]  # top, bottom, left, right in the padded image


def _fit_axis(image_size: int, input_size: int, margin: int, both_sides: bool) -> tuple[int, int, int, int]:
    """Window start/end and padding (front, back) for an axis that is too short."""
    pad = input_size - image_size + margin * (2 if both_sides else 1)
    front, start = (int(pad / 2), margin) if both_sides else (0, 0)
    return start, start + input_size, front, pad - front


def _inside(start: int, end: int, size: int, length: int) -> tuple[int, int]:
    if start < 0:
        return 0, length
    if end > size:
        return size - length, size
    return start, end


def sample_window(
    shape: tuple[int, int],
    angle: str,
    center: tuple[int, int],
    rng: np.random.RandomState,
    max_crop_noise: tuple[int, int],
    max_crop_size_noise: int,
) -> Window:
    height, width = shape
    size = INPUT_SIZE[angle]
    crop_noise = np.array(max_crop_noise)
    multiplier = np.zeros(2, dtype=np.float32)
    if crop_noise.any():
        multiplier = rng.uniform(low=-1.0, high=1.0, size=2)

    top = center[0] - size[0] // 2
    bottom = center[0] + size[0] - size[0] // 2
    left = center[1] - size[1] // 2
    right = center[1] + size[1] - size[1] // 2

    pad_top = pad_bottom = pad_right = 0
    if angle == "CC":
        if height < size[0] + (crop_noise[0] + max_crop_size_noise) * 2:
            top, bottom, pad_top, pad_bottom = _fit_axis(height, size[0], crop_noise[0] + max_crop_size_noise, True)
    elif height < size[0] + crop_noise[0] + max_crop_size_noise:
        top, bottom, _, pad_bottom = _fit_axis(height, size[0], crop_noise[0] + max_crop_size_noise, False)
    if width < size[1] + crop_noise[1] + max_crop_size_noise:
        left, right, _, pad_right = _fit_axis(width, size[1], crop_noise[1] + max_crop_size_noise, False)
    padded_h = height + pad_top + pad_bottom
    padded_w = width + pad_right

    top, bottom = _inside(top, bottom, padded_h, size[0])
    left, right = _inside(left, right, padded_w, size[1])

    # Noise only points where the window has room to move.
    if top == 0:
        multiplier[0] = np.abs(multiplier[0])
    elif bottom == padded_h:
        multiplier[0] = -np.abs(multiplier[0])
    if left == 0:
        multiplier[1] = np.abs(multiplier[1])
    elif right == padded_w:
        multiplier[1] = -np.abs(multiplier[1])

    vertical_room = (padded_h - bottom) if multiplier[0] >= 0 else top
    horizontal_room = (padded_w - right) if multiplier[1] >= 0 else left
    crop_noise[0] = min(crop_noise[0], vertical_room)
    crop_noise[1] = min(crop_noise[1], horizontal_room)
    shift = np.round(crop_noise * multiplier)
    borders = np.array((top, bottom, left, right), dtype=np.int32) + np.array(
        (shift[0], shift[0], shift[1], shift[1]), dtype=np.int32
    )

    # Border (size) noise.
    size_multiplier = rng.uniform(low=-1.0, high=1.0, size=4)
    room = min(max_crop_size_noise, borders[0], padded_h - borders[1], borders[2], padded_w - borders[3])
    if size[0] >= size[1]:
        vertical, horizontal = room, np.round(room * (size[1] / size[0]))
    else:
        vertical, horizontal = np.round(room * (size[0] / size[1])), room
    limits = np.array((vertical, vertical, horizontal, horizontal), dtype=np.int32)
    borders = borders + np.array(np.round(limits * size_multiplier), dtype=np.int32)
    if not (0 <= borders[0] < borders[1] <= padded_h and 0 <= borders[2] < borders[3] <= padded_w):
        raise ValueError(f"augmentation window {borders.tolist()} outside image {padded_h}x{padded_w}")
    return Window(pad_top, pad_bottom, pad_right, tuple(int(b) for b in borders))


def cut(image: np.ndarray, window: Window, angle: str) -> np.ndarray:
    """Cut ``window`` from ``image`` (H, W) or (H, W, C), zero-padded, resized to the input size.

    The window's borders are in the frame of the image padded with zeros (``pad_top`` rows
    above, ``pad_bottom`` below, ``pad_right`` columns on the right). Only the window is
    built, from the part of the image it overlaps: padding the whole image for every epoch
    copied it each time, for the same pixels."""
    top, bottom, left, right = window.borders
    if window.pad_top or window.pad_bottom or window.pad_right:
        height, width = image.shape[:2]
        out = np.zeros((bottom - top, right - left, *image.shape[2:]), dtype=image.dtype)
        rows = (max(top, window.pad_top), min(bottom, window.pad_top + height))
        cols = (max(left, 0), min(right, width))
        if rows[0] < rows[1] and cols[0] < cols[1]:
            out[rows[0] - top : rows[1] - top, cols[0] - left : cols[1] - left] = image[
                rows[0] - window.pad_top : rows[1] - window.pad_top, cols[0] : cols[1]
            ]
    else:
        out = image[top:bottom, left:right]
    size = INPUT_SIZE[angle]
    if out.shape[:2] != size:
        out = cv2.resize(out, (size[1], size[0]), interpolation=cv2.INTER_CUBIC)
    return out

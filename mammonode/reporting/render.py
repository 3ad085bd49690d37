"""Pictures for radiologists: heatmap overlays on the mammogram, and the four-view summary.

Heatmap probabilities map to OpenCV's "inferno" colormap (perceptually uniform) on a fixed
0-1 scale, so colours compare across views and studies; the overlay's opacity is
proportional to the probability, so low probabilities leave the mammogram visible.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

NOT_FOR_DIAGNOSIS = "NOT FOR PRIMARY DIAGNOSIS"
TEST_NOTICE = "TEST WEIGHTS \u2014 NOT FOR CLINICAL USE"  # SR text (UTF-8)
TEST_NOTICE_BURNED = "TEST WEIGHTS - NOT FOR CLINICAL USE"  # burned-in (the built-in font has no em dash)
ALPHA_PER_PROBABILITY = 0.85
SUMMARY_SIZE = (1080, 1920)  # rows, columns: one 1080p screen at 100 % zoom
_WHITE = (255, 255, 255)
_AMBER = (255, 190, 40)
_RED = (255, 80, 80)


@lru_cache(maxsize=16)
def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def grey8(image: np.ndarray) -> np.ndarray:
    """Display window from the breast's own intensities (background stays black)."""
    tissue = image[image > 0]
    if tissue.size == 0:
        return np.zeros(image.shape, dtype=np.uint8)
    low, high = np.percentile(tissue, [0.5, 99.8])
    if high <= low:
        high = low + 1
    scaled = (image.astype(np.float32) - low) * (255.0 / (high - low))
    out = np.clip(scaled, 0, 255).astype(np.uint8)
    out[image <= 0] = 0
    return out


def colormap(probability: np.ndarray) -> np.ndarray:
    """RGB colours for probabilities in [0, 1]."""
    index = np.clip(np.nan_to_num(probability) * 255.0, 0, 255).astype(np.uint8)
    return cv2.applyColorMap(index, cv2.COLORMAP_INFERNO)[..., ::-1]


def overlay(grey: np.ndarray, heatmap: np.ndarray | None) -> np.ndarray:
    """RGB image: grey mammogram with the heatmap blended over breast tissue (non-zero
    pixels) where it is defined (not NaN)."""
    rgb = np.repeat(grey[..., None], 3, axis=2).astype(np.float32)
    if heatmap is not None:
        alpha = np.clip(np.nan_to_num(heatmap, nan=0.0), 0, 1) * ALPHA_PER_PROBABILITY
        alpha = (alpha * (grey > 0))[..., None]
        rgb = rgb * (1 - alpha) + colormap(heatmap).astype(np.float32) * alpha
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _colour_bar(
    draw: ImageDraw.ImageDraw, canvas: Image.Image, x: int, y: int, width: int, height: int, size: int, title: str
) -> None:
    values = np.linspace(1.0, 0.0, height)[:, None].repeat(width, axis=1)
    bar = Image.fromarray(colormap(values))
    canvas.paste(bar, (x, y))
    draw.rectangle([x - 1, y - 1, x + width, y + height], outline=_WHITE, width=max(1, size // 12))
    f = font(size)
    for value in (1.0, 0.5, 0.0):
        ty = y + int((1 - value) * (height - 1))
        draw.line([x + width, ty, x + width + size // 2, ty], fill=_WHITE, width=max(1, size // 12))
        draw.text((x + width + size // 2 + 4, ty), f"{value:.1f}", fill=_WHITE, font=f, anchor="lm")
    draw.text((x, y - size // 2), title, fill=_WHITE, font=f, anchor="ld")


@dataclass
class OverlayLabels:
    view: str
    model: str
    test_weights: bool
    heatmap_kind: str = "malignant"


def annotated_overlay(
    grey: np.ndarray, heatmap: np.ndarray | None, faces_right: bool, labels: OverlayLabels
) -> np.ndarray:
    """Full-resolution overlay with colour bar and burned-in labels on the background side."""
    rgb = overlay(grey, heatmap)
    height, width = grey.shape
    canvas = Image.fromarray(rgb)
    draw = ImageDraw.Draw(canvas)
    size = max(14, height // 55)
    margin = size
    lines = [
        (
            f"{labels.view}  {labels.heatmap_kind} heatmap"
            if heatmap is not None
            else f"{labels.view}  (no heatmap: patch model did not run)",
            _WHITE,
        ),
        (labels.model, _WHITE),
        (NOT_FOR_DIAGNOSIS, _AMBER),
    ]
    if labels.test_weights:
        lines.append((TEST_NOTICE_BURNED, _RED))
    f = font(size)
    anchor_x = width - margin if faces_right else margin
    text_anchor = "ra" if faces_right else "la"
    # A dark panel behind the labels keeps them legible over the modality's own annotations.
    line_h = int(size * 1.35)
    box_w = max(int(draw.textlength(text, font=f)) for text, _ in lines) + size
    box_x0 = width - box_w - margin // 2 if faces_right else margin // 2
    panel = Image.new("RGBA", (box_w, line_h * len(lines) + size // 2), (0, 0, 0, 200))
    canvas.paste(panel, (box_x0, margin // 2), panel)
    for i, (text, colour) in enumerate(lines):
        draw.text(
            (anchor_x, margin + i * line_h),
            text,
            fill=colour,
            font=f,
            anchor=text_anchor,
            stroke_width=max(1, size // 16),
            stroke_fill=(0, 0, 0),
        )
    if heatmap is not None:
        bar_w = max(12, width // 40)
        bar_h = height // 3
        bar_x = width - margin - bar_w - size * 3 if faces_right else margin
        bar_y = height - margin - bar_h
        _colour_bar(draw, canvas, bar_x, bar_y, bar_w, bar_h, size, f"P({labels.heatmap_kind})")
    return np.asarray(canvas)


def _fit(image: np.ndarray, height: int, width: int) -> np.ndarray:
    scale = min(height / image.shape[0], width / image.shape[1])
    size = (max(1, int(image.shape[1] * scale)), max(1, int(image.shape[0] * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


# Screen layout: right breast on the left of the screen, CC above MLO.
HANGING = (("R-CC", 0, 0), ("L-CC", 0, 1), ("R-MLO", 1, 0), ("L-MLO", 1, 1))


def summary_image(
    panels: Mapping[str, np.ndarray], table: list[tuple[str, str, str]], density_lines: list[str], notices: list[str]
) -> np.ndarray:
    """1920x1080 RGB: the four overlays in hanging order and a score table beside them.

    ``panels``: view -> RGB overlay as stored (R facing left, L facing right);
    ``table``: rows of (label, right breast, left breast).
    """
    rows, cols = SUMMARY_SIZE
    canvas = Image.new("RGB", (cols, rows), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    grid_w, cell_h = 1240, rows // 2
    cell_w = grid_w // 2
    label_font = font(22)
    for view, r, c in HANGING:
        x0, y0 = c * cell_w, r * cell_h
        if view in panels:
            fitted = _fit(panels[view], cell_h - 40, cell_w - 10)
            # Right views hug the centre line from the left, left views from the right.
            px = x0 + (cell_w - fitted.shape[1] - 5 if c == 0 else 5)
            canvas.paste(Image.fromarray(fitted), (px, y0 + 35))
        draw.text((x0 + cell_w // 2, y0 + 6), view, fill=_WHITE, font=label_font, anchor="ma")
        draw.rectangle([x0, y0, x0 + cell_w - 1, y0 + cell_h - 1], outline=(70, 70, 70))

    x = grid_w + 30
    y = 20
    draw.text((x, y), "mammonode AI results", fill=_WHITE, font=font(32))
    y += 56
    head = font(22)
    body = font(21)
    col_r, col_l = x + 380, x + 520
    draw.text((x, y), "per breast", fill=(180, 180, 180), font=head)
    draw.text((col_r, y), "Right", fill=_WHITE, font=head, anchor="ra")
    draw.text((col_l, y), "Left", fill=_WHITE, font=head, anchor="ra")
    y += 34
    for label, right, left in table:
        draw.text((x, y), label, fill=_WHITE, font=body)
        draw.text((col_r, y), right, fill=_WHITE, font=body, anchor="ra")
        draw.text((col_l, y), left, fill=_WHITE, font=body, anchor="ra")
        y += 31
    y += 20
    for line in density_lines:
        draw.text((x, y), line, fill=_WHITE, font=body)
        y += 31
    y += 12
    _colour_bar(draw, canvas, x, y + 30, 24, 200, 20, "P(malignant) overlay")
    y += 260
    for notice in notices:
        colour = _RED if "TEST" in notice else _AMBER
        draw.text((x, y), notice, fill=colour, font=font(22))
        y += 32
    return np.asarray(canvas)

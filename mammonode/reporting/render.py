"""Pictures for radiologists: heatmap overlays on the mammogram, and the four-view summary.

Heatmap probabilities map to OpenCV's "inferno" colormap (perceptually uniform) on a fixed
0-1 scale, so colours compare across views and studies. Only probabilities at or above a
threshold are coloured (``[results] heatmap_threshold``): normal tissue keeps its grey scale,
and the RGB image stays grey (R = G = B) where nothing is shown, which also keeps it small once
compressed. Above the threshold the overlay's opacity grows with the probability.

Labels are drawn where the image is empty: the background side of the breast, away from the
modality's own burned-in markers (found as bright pixels in the background, not assumed at a
fixed corner).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

NOT_FOR_DIAGNOSIS = "NOT FOR PRIMARY DIAGNOSIS"
TEST_NOTICE = "TEST WEIGHTS \u2014 NOT FOR CLINICAL USE"  # SR text (UTF-8)
TEST_NOTICE_BURNED = "TEST WEIGHTS - NOT FOR CLINICAL USE"  # burned-in (the built-in font has no em dash)
ALPHA_AT_THRESHOLD = 0.45  # overlay opacity at the threshold, rising linearly ...
ALPHA_AT_ONE = 0.85  # ... to this at probability 1
SUMMARY_SIZE = (1080, 1920)  # rows, columns: one 1080p screen at 100 % zoom
SUMMARY_MIN_FONT = 18  # no text on the summary is smaller (pixels)
OCCUPIED_LEVEL = 8  # display value above which a pixel is tissue or a burned-in marker
_WHITE = (255, 255, 255)
_GREY = (170, 170, 170)
_AMBER = (255, 190, 40)
_RED = (255, 80, 80)
_BELOW = (90, 90, 90)  # colour-bar segment for values not shown


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


def percent(probability: float) -> str:
    """Probabilities are shown in % on every picture, as in the SR and the Parametric Maps."""
    return f"{100 * probability:.0f} %"


def colormap(probability: np.ndarray) -> np.ndarray:
    """RGB colours for probabilities in [0, 1]."""
    index = np.clip(np.nan_to_num(probability) * 255.0, 0, 255).astype(np.uint8)
    return cv2.applyColorMap(index, cv2.COLORMAP_INFERNO)[..., ::-1]


def overlay(grey: np.ndarray, heatmap: np.ndarray | None, threshold: float) -> np.ndarray:
    """RGB image: the grey mammogram, coloured over breast tissue (non-zero pixels) where the
    heatmap is defined (not NaN) and at least ``threshold``; everywhere else exactly grey."""
    rgb = np.repeat(grey[..., None], 3, axis=2)
    if heatmap is None:
        return rgb
    values = np.nan_to_num(heatmap, nan=-1.0)
    shown = (values >= threshold) & (grey > 0)
    if not shown.any():
        return rgb
    p = np.clip(values[shown], 0.0, 1.0)
    span = max(1.0 - threshold, 1e-6)
    alpha = (ALPHA_AT_THRESHOLD + (ALPHA_AT_ONE - ALPHA_AT_THRESHOLD) * (p - threshold) / span)[:, None]
    blended = rgb[shown].astype(np.float32) * (1 - alpha) + colormap(p).astype(np.float32) * alpha
    rgb[shown] = np.clip(blended, 0, 255).astype(np.uint8)
    return rgb


# --- placing labels on empty background ---------------------------------------------------


@dataclass(frozen=True)
class Box:
    x: int
    y: int
    w: int
    h: int

    def overlaps(self, other: Box) -> bool:
        return not (
            self.x + self.w <= other.x
            or other.x + other.w <= self.x
            or self.y + self.h <= other.y
            or other.y + other.h <= self.y
        )


class Occupancy:
    """Counts occupied (tissue or marker) pixels in any rectangle in constant time."""

    def __init__(self, grey: np.ndarray) -> None:
        occupied = (grey > OCCUPIED_LEVEL).astype(np.int64)
        self.table = np.pad(occupied.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        self.height, self.width = grey.shape

    def count(self, box: Box, pad: int = 0) -> int:
        y0, x0 = max(0, box.y - pad), max(0, box.x - pad)
        y1, x1 = min(self.height, box.y + box.h + pad), min(self.width, box.x + box.w + pad)
        if y1 <= y0 or x1 <= x0:
            return 0
        t = self.table
        return int(t[y1, x1] - t[y0, x1] - t[y1, x0] + t[y0, x0])


def place(
    occupancy: Occupancy, w: int, h: int, right: bool, margin: int, prefer_top: bool, avoid: Sequence[Box] = ()
) -> Box:
    """A ``w`` x ``h`` box against the left or right edge, at the height that covers the fewest
    occupied pixels (with a margin of clearance) and no box in ``avoid``; ties go to the top
    or the bottom as asked. Scans in steps of a quarter box height."""
    x = occupancy.width - margin - w if right else margin
    x = max(0, x)
    last = max(margin, occupancy.height - margin - h)
    step = max(1, h // 4)
    ys = list(range(margin, last, step)) + [last]
    if not prefer_top:
        ys.reverse()
    best, best_cost = None, None
    for y in ys:
        box = Box(x, y, w, h)
        if any(box.overlaps(other) for other in avoid):
            continue
        cost = occupancy.count(box, pad=margin // 2)
        if best_cost is None or cost < best_cost:
            best, best_cost = box, cost
    return best or Box(x, margin, w, h)


# --- heatmap Secondary Capture ------------------------------------------------------------


@dataclass
class OverlayLabels:
    view: str
    model: str
    test_weights: bool
    heatmap_kind: str = "malignant"
    threshold: float = 0.5


def _text_lines(labels: OverlayLabels, has_heatmap: bool) -> list[tuple[str, tuple[int, int, int]]]:
    first = (
        f"{labels.view}  {labels.heatmap_kind} heatmap"
        if has_heatmap
        else f"{labels.view}  (no heatmap: patch model did not run)"
    )
    lines = [(first, _WHITE), (labels.model, _WHITE)]
    if has_heatmap:
        lines.append((f"coloured where P({labels.heatmap_kind}) >= {percent(labels.threshold)}", _WHITE))
    lines.append((NOT_FOR_DIAGNOSIS, _AMBER))
    if labels.test_weights:
        lines.append((TEST_NOTICE_BURNED, _RED))
    return lines


def _draw_panel(canvas: Image.Image, box: Box, alpha: int = 200) -> None:
    panel = Image.new("RGBA", (box.w, box.h), (0, 0, 0, alpha))
    canvas.paste(panel, (box.x, box.y), panel)


def colour_bar(canvas: Image.Image, box: Box, size: int, title: str, threshold: float, right_aligned: bool) -> None:
    """A vertical 0-1 bar inside ``box`` on a dark panel: the colour map from the threshold up,
    a flat grey below it (not shown), ticks at 100 %, the threshold and 0 %, and the title above.
    Text is anchored towards the image edge the box stands against, so it is never cut."""
    draw = ImageDraw.Draw(canvas)
    f = font(size)
    _draw_panel(canvas, box, alpha=170)
    tick_w = int(max(draw.textlength(percent(v), font=f) for v in (1.0, threshold, 0.0)))
    bar_w = max(12, size)
    bar_h = box.h - int(size * 2.6)
    pad = size // 2
    bar_x = box.x + box.w - pad - tick_w - size // 2 - 6 - bar_w if right_aligned else box.x + pad
    bar_y = box.y + int(size * 2.0)
    values = np.linspace(1.0, 0.0, bar_h)[:, None].repeat(bar_w, axis=1)
    colours = colormap(values)
    colours[values < threshold] = _BELOW
    canvas.paste(Image.fromarray(colours), (bar_x, bar_y))
    line = max(1, size // 12)
    draw.rectangle([bar_x - 1, bar_y - 1, bar_x + bar_w, bar_y + bar_h], outline=_WHITE, width=line)
    for value in sorted({1.0, threshold, 0.0}, reverse=True):
        ty = bar_y + int((1 - value) * (bar_h - 1))
        draw.line([bar_x + bar_w, ty, bar_x + bar_w + size // 2, ty], fill=_WHITE, width=line)
        draw.text((bar_x + bar_w + size // 2 + 4, ty), percent(value), fill=_WHITE, font=f, anchor="lm")
    title_x, anchor = (box.x + box.w - pad, "ra") if right_aligned else (box.x + pad, "la")
    draw.text((title_x, box.y + pad // 2), title, fill=_WHITE, font=f, anchor=anchor)


def colour_bar_size(size: int, title: str, threshold: float, height: int) -> tuple[int, int]:
    """Width and height of the box :func:`colour_bar` needs for this title and bar height."""
    f = font(size)
    tick_w = max(f.getlength(percent(v)) for v in (1.0, threshold, 0.0))
    bar_part = size // 2 + max(12, size) + size // 2 + 4 + tick_w + size // 2
    return int(max(bar_part, f.getlength(title) + size)) + 2, height


def annotated_overlay(
    grey: np.ndarray, heatmap: np.ndarray | None, faces_right: bool, labels: OverlayLabels
) -> np.ndarray:
    """Full-resolution overlay with burned-in labels and colour bar on the background side
    (opposite the chest wall), each where it covers the fewest tissue and marker pixels."""
    rgb = overlay(grey, heatmap, labels.threshold)
    height, width = grey.shape
    canvas = Image.fromarray(rgb)
    draw = ImageDraw.Draw(canvas)
    size = max(14, height // 60)
    margin = size
    occupancy = Occupancy(grey)
    lines = _text_lines(labels, heatmap is not None)
    f = font(size)
    line_h = int(size * 1.35)
    box_w = int(max(draw.textlength(text, font=f) for text, _ in lines)) + size
    text_box = place(occupancy, box_w, line_h * len(lines) + size // 2, faces_right, margin // 2, prefer_top=True)
    _draw_panel(canvas, text_box)
    x, anchor = (text_box.x + text_box.w - size // 2, "ra") if faces_right else (text_box.x + size // 2, "la")
    for i, (text, colour) in enumerate(lines):
        draw.text((x, text_box.y + size // 4 + i * line_h), text, fill=colour, font=f, anchor=anchor)
    if heatmap is not None:
        title = f"P({labels.heatmap_kind})"
        w, h = colour_bar_size(size, title, labels.threshold, height // 4)
        bar_box = place(occupancy, w, h, faces_right, margin // 2, prefer_top=False, avoid=[text_box])
        colour_bar(canvas, bar_box, size, title, labels.threshold, right_aligned=faces_right)
    return np.asarray(canvas)


# --- the summary --------------------------------------------------------------------------


def _fit(image: np.ndarray, height: int, width: int) -> np.ndarray:
    scale = min(height / image.shape[0], width / image.shape[1])
    size = (max(1, int(image.shape[1] * scale)), max(1, int(image.shape[0] * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


# Screen layout: right breast on the left of the screen, CC above MLO.
HANGING = (("R-CC", 0, 0), ("L-CC", 0, 1), ("R-MLO", 1, 0), ("L-MLO", 1, 1))
GRID_WIDTH = 1240  # the four panels; the text column is to their right


@dataclass
class SummaryPanel:
    """One view on the summary: its overlay as stored (without full-resolution labels; the
    summary draws its own at summary scale) and a caption such as the heatmap maximum."""

    pixels: np.ndarray
    caption: str = ""
    scores: list[str] = field(default_factory=list)  # the image-wise models' scores of this view


@dataclass
class SummaryText:
    identity: list[str]  # patient, study, analysis time, software and weights
    table: list[tuple[str, str, str]]  # (label, right breast, left breast)
    density: list[str]
    notices: list[str]
    threshold: float = 0.5
    missing: list[str] = field(default_factory=list)  # views absent from a partial result


def _panel_label(draw: ImageDraw.ImageDraw, x: int, y: int, text: str, size: int, anchor: str) -> None:
    draw.text((x, y), text, fill=_WHITE, font=font(size), anchor=anchor, stroke_width=2, stroke_fill=(0, 0, 0))


def _draw_panels(canvas: Image.Image, panels: Mapping[str, SummaryPanel], missing: Sequence[str] = ()) -> None:
    draw = ImageDraw.Draw(canvas)
    rows = canvas.height
    cell_w, cell_h = GRID_WIDTH // 2, rows // 2
    for view, r, c in HANGING:
        x0, y0 = c * cell_w, r * cell_h
        panel = panels.get(view)
        if panel is not None:
            fitted = _fit(panel.pixels, cell_h - 40, cell_w - 10)
            # Right views hug the centre line from the left, left views from the right.
            px = x0 + (cell_w - fitted.shape[1] - 5 if c == 0 else 5)
            canvas.paste(Image.fromarray(fitted), (px, y0 + 35))
        # Labels on the outer side of each cell: the breast sits against the centre line.
        outer_x, anchor = (x0 + 12, "la") if c == 0 else (x0 + cell_w - 12, "ra")
        _panel_label(draw, outer_x, y0 + 6, view, 24, anchor)
        if panel is not None and panel.caption:
            _panel_label(draw, outer_x, y0 + cell_h - 34, panel.caption, 20, anchor)
        if panel is not None:  # the image-wise scores, stacked above the caption
            for i, line in enumerate(reversed(panel.scores), start=1):
                _panel_label(draw, outer_x, y0 + cell_h - 34 - 28 * i, line, SUMMARY_MIN_FONT, anchor)
        elif view in missing:
            draw.text(
                (x0 + cell_w // 2, y0 + cell_h // 2),
                f"{view}: not in the study\n(no usable image)",
                fill=_AMBER,
                font=font(24),
                anchor="mm",
                align="center",
                spacing=8,
            )
        draw.rectangle([x0, y0, x0 + cell_w - 1, y0 + cell_h - 1], outline=(70, 70, 70))


def _draw_text_column(canvas: Image.Image, text: SummaryText) -> None:
    draw = ImageDraw.Draw(canvas)
    x = GRID_WIDTH + 24
    right_edge = canvas.width - 16
    y = 14
    draw.text((x, y), "mammonode AI results", fill=_WHITE, font=font(30))
    y += 44
    for i, line in enumerate(text.identity):
        draw.text((x, y), line, fill=_WHITE if i < 3 else _GREY, font=font(19))
        y += 25
    y += 12
    head, body = font(21), font(20)
    col_r, col_l = x + 470, right_edge
    if text.table or not text.missing:
        draw.text((x, y), "per breast", fill=_GREY, font=head)
        draw.text((col_r, y), "Right", fill=_WHITE, font=head, anchor="ra")
        draw.text((col_l, y), "Left", fill=_WHITE, font=head, anchor="ra")
        y += 30
    else:  # a partial result: no per-breast score, the image-wise scores are under each view
        for line in (
            "No per-breast score: the view-wise model needs",
            "all four views. Image-wise scores under each view.",
        ):
            draw.text((x, y), line, fill=_AMBER, font=body)
            y += 27
    for label, right, left in text.table:
        draw.text((x, y), label, fill=_WHITE, font=body)
        draw.text((col_r, y), right, fill=_WHITE, font=body, anchor="ra")
        draw.text((col_l, y), left, fill=_WHITE, font=body, anchor="ra")
        y += 27
    y += 12
    for line in text.density:
        draw.text((x, y), line, fill=_WHITE, font=body)
        y += 27
    y += 10
    title = "Overlay: P(malignant)"
    w, h = colour_bar_size(SUMMARY_MIN_FONT, title, text.threshold, 170)
    colour_bar(canvas, Box(x, y, w, h), SUMMARY_MIN_FONT, title, text.threshold, right_aligned=False)
    draw.text(
        (x + w + 16, y + 30),
        f"coloured only where\nP >= {percent(text.threshold)}",
        fill=_GREY,
        font=font(SUMMARY_MIN_FONT),
        spacing=6,
    )
    y += h + 14
    for notice in text.notices:
        draw.text((x, y), notice, fill=_RED if "TEST" in notice else _AMBER, font=font(21))
        y += 28


def summary_image(panels: Mapping[str, SummaryPanel], text: SummaryText) -> np.ndarray:
    """1920x1080 RGB: the four overlays in hanging order with labels at screen scale, and
    beside them who and what this is (patient, study, analysis, software, weights), the
    score table, density, the colour scale and the notices."""
    rows, cols = SUMMARY_SIZE
    canvas = Image.new("RGB", (cols, rows), (0, 0, 0))
    _draw_panels(canvas, panels, text.missing)
    _draw_text_column(canvas, text)
    return np.asarray(canvas)

"""The result images of one study version, in the order they are sent: heatmap Secondary
Captures (one series per breast and heatmap kind), the Parametric Maps (one series), and the
summary. ``uid(kind)`` gives each object's and series' stable UID (objects.py decides how).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime

from pydicom.dataset import Dataset

from mammonode.config import ResultsSection
from mammonode.exam.views import VIEWS, angle, laterality
from mammonode.pipeline.run import PipelineResult
from mammonode.reporting.content import model_identity
from mammonode.reporting.parametric_map import parametric_map
from mammonode.reporting.secondary_capture import (
    SourceImage,
    heatmap_sc,
    overlay_pixels,
    summary_pixels,
    summary_sc,
)


def _instance_number(view: str) -> int:
    """Within a breast's series: CC first, then MLO."""
    return 1 if angle(view) == "CC" else 2


def result_images(
    result: PipelineResult,
    sources: Mapping[str, SourceImage],
    uid: Callable[[str], str],
    settings: ResultsSection | None = None,
    analysed_at: datetime | None = None,
    device_serial_number: str = "mammonode",
) -> list[tuple[str, Dataset]]:
    """(kind, data set) of every result image: ``sc-<heatmap>-<view>`` (each view in ``sources``),
    ``pm-malignant-<view>`` (views with a heatmap, when ``settings.parametric_maps``), ``summary``."""
    settings = settings or ResultsSection()
    analysed_at = analysed_at or datetime.now()
    identity = model_identity(result)
    out: list[tuple[str, Dataset]] = []
    kinds = ["malignant"] + (["benign"] if settings.benign_heatmaps else [])
    present = [v for v in VIEWS if v in sources]  # fewer than four for a partial result
    for kind in kinds:
        for view in present:
            pixels = overlay_pixels(result, sources[view], kind, settings.heatmap_threshold)
            sc = heatmap_sc(
                sources[view],
                pixels,
                kind,
                uid(f"series-heatmap-{kind}-{laterality(view)}"),
                uid(f"sc-{kind}-{view}"),
                _instance_number(view),
                settings.sc_compression,
                result.test_weights,
            )
            sc.ImageComments = identity
            out.append((f"sc-{kind}-{view}", sc))
    if settings.parametric_maps:
        for view in present:
            number = VIEWS.index(view) + 1  # the view's own number, partial result or not
            pm = parametric_map(
                result,
                sources[view],
                uid("series-pm-malignant"),
                uid(f"pm-malignant-{view}"),
                number,
                uid(f"frame-of-reference-pm-malignant-{view}"),
                device_serial_number,
                settings.sc_compression,
            )
            if pm is not None:
                out.append((f"pm-malignant-{view}", pm))
    headers = [sources[v].dataset for v in present]
    summary = summary_sc(
        summary_pixels(result, dict(sources), settings.heatmap_threshold, analysed_at),
        headers[0],
        headers,
        uid("series-summary"),
        uid("summary"),
        settings.sc_compression,
        result.test_weights,
        analysed_at,
    )
    summary.ImageComments = identity
    out.append(("summary", summary))
    return out

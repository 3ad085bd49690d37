"""A study version's result objects, built from a PipelineResult and the source headers.

Pure: no database, no files. UIDs are stable for (study, input selection, object kind), so
building the same version again gives the same objects.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from mammonode.exam.orientation import Frame
from mammonode.exam.views import VIEWS
from mammonode.pipeline.images import PreparedView
from mammonode.pipeline.run import PipelineResult
from mammonode.reporting.content import density_lines, model_identity, score_table
from mammonode.reporting.render import NOT_FOR_DIAGNOSIS, TEST_NOTICE_BURNED, summary_image
from mammonode.reporting.secondary_capture import SourceImage, heatmap_sc, overlay_pixels, summary_sc
from mammonode.reporting.tid1500 import build_sr
from mammonode.reporting.uids import stable_uid


@dataclass
class BuiltObject:
    kind: str
    dataset: Dataset


def sources_from_prepared(
    prepared: Mapping[str, PreparedView], headers: Mapping[str, Dataset]
) -> dict[str, SourceImage]:
    out = {}
    for view in VIEWS:
        p = prepared[view]
        grey = np.ascontiguousarray(p.orientation.convert(p.image, Frame.ACQUIRED, Frame.STORED))
        out[view] = SourceImage(view=view, dataset=headers[view], grey=grey, orientation=p.orientation)
    return out


def build_objects(
    result: PipelineResult,
    sources: Mapping[str, SourceImage],
    study_uid: str,
    selection_key: str,
    benign_overlays: bool = False,
) -> list[BuiltObject]:
    """SCs (one malignant-heatmap overlay per view, optionally benign), the summary, then the
    SR that references them all. UIDs are stable for (study, inputs, kind)."""
    objects: list[BuiltObject] = []
    headers = [sources[v].dataset for v in VIEWS]
    kinds = ["malignant"] + (["benign"] if benign_overlays else [])
    panels = {}
    for kind in kinds:
        series_uid = stable_uid(study_uid, selection_key, f"series-heatmap-{kind}")
        for number, view in enumerate(VIEWS, start=1):
            sop_uid = stable_uid(study_uid, selection_key, f"sc-{kind}-{view}")
            pixels = overlay_pixels(result, sources[view], kind)
            sc = heatmap_sc(sources[view], pixels, kind, series_uid, sop_uid, number)
            sc.ImageComments = model_identity(result)
            objects.append(BuiltObject(kind=f"sc-{kind}-{view}", dataset=sc))
            if kind == "malignant":
                panels[view] = pixels
    notices = [NOT_FOR_DIAGNOSIS] + ([TEST_NOTICE_BURNED] if result.test_weights else [])
    pixels = summary_image(panels, score_table(result), density_lines(result), notices)
    summary = summary_sc(
        pixels,
        headers[0],
        headers,
        stable_uid(study_uid, selection_key, "series-summary"),
        stable_uid(study_uid, selection_key, "summary"),
    )
    summary.ImageComments = model_identity(result)
    objects.append(BuiltObject(kind="summary", dataset=summary))
    produced = [o.dataset for o in objects]
    sr = build_sr(
        result,
        headers,
        produced,
        stable_uid(study_uid, selection_key, "series-sr"),
        stable_uid(study_uid, selection_key, "sr"),
    )
    objects.append(BuiltObject(kind="sr", dataset=sr))
    return objects

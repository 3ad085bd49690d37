"""Secondary Capture images (highdicom): one heatmap overlay per view, and the summary.

Secondary Capture is the one image type every PACS viewer shows. Each overlay keeps the
source mammogram's orientation and pixel geometry (Pixel Spacing copied) so it can be read
beside the original; labels are burned in and BurnedInAnnotation says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from mammonode import __version__
from mammonode.exam.orientation import Frame, Orientation
from mammonode.exam.views import laterality
from mammonode.pipeline.registry import spec
from mammonode.pipeline.run import PipelineResult
from mammonode.reporting.render import OverlayLabels, annotated_overlay, grey8

MANUFACTURER = "mammonode"
SERIES_NUMBERS = {"heatmap-malignant": 9101, "heatmap-benign": 9102, "summary": 9103, "sr": 9100}


@dataclass
class SourceImage:
    """A pipeline input as the node received it."""

    view: str
    dataset: Dataset  # header (pixel data not needed)
    grey: np.ndarray  # display values in the STORED frame (Modality LUT applied, MONOCHROME1 inverted)
    orientation: Orientation


def heatmap_as_stored(result: PipelineResult, source: SourceImage, kind: str) -> np.ndarray | None:
    view = result.views[source.view]
    if view.heatmap_malignant is None:
        return None
    return view.heatmap_in_frame(kind, source.grey.shape, Frame.STORED)


def overlay_pixels(result: PipelineResult, source: SourceImage, kind: str = "malignant") -> np.ndarray:
    labels = OverlayLabels(
        view=source.view, model=spec("patch").title, test_weights=result.test_weights, heatmap_kind=kind
    )
    return annotated_overlay(
        grey8(source.grey),
        heatmap_as_stored(result, source, kind),
        source.orientation.faces_right(Frame.STORED),
        labels,
    )


def _orientation(ds: Dataset) -> list[str] | None:
    value = list(ds.get("PatientOrientation", []) or [])
    return [str(value[0]), str(value[1])] if len(value) == 2 and value[0] and value[1] else None


def _finish(sc: Dataset, description: str, derived_from: list[Dataset]) -> Dataset:
    sc.BurnedInAnnotation = "YES"
    sc.SeriesDescription = description
    sc.SoftwareVersions = __version__
    sc.DerivationDescription = "AI result rendered by mammonode; not for primary diagnosis"
    refs = []
    for src in derived_from:
        item = Dataset()
        item.ReferencedSOPClassUID = src.SOPClassUID
        item.ReferencedSOPInstanceUID = src.SOPInstanceUID
        refs.append(item)
    sc.SourceImageSequence = refs
    return sc


def heatmap_sc(
    source: SourceImage, pixels: np.ndarray, kind: str, series_uid: str, sop_uid: str, instance_number: int
) -> Dataset:
    spacing = source.dataset.get("PixelSpacing") or source.dataset.get("ImagerPixelSpacing")
    orientation = _orientation(source.dataset)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source.dataset,
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_uid,
        series_number=SERIES_NUMBERS[f"heatmap-{kind}"],
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        pixel_spacing=(float(spacing[0]), float(spacing[1])) if spacing else None,
        laterality=laterality(source.view),
        # highdicom takes one letter per direction; the full value (e.g. "FR") is copied below.
        patient_orientation=tuple(v[0] for v in orientation) if orientation else None,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
    )
    if orientation:
        sc.PatientOrientation = orientation
    return _finish(sc, f"AI {kind} heatmap (mammonode)", [source.dataset])


def summary_sc(
    pixels: np.ndarray, reference: Dataset, sources: list[Dataset], series_uid: str, sop_uid: str
) -> Dataset:
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=reference,
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_uid,
        series_number=SERIES_NUMBERS["summary"],
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        patient_orientation=("A", "R"),  # replaced below: a composite of four views has no one orientation
        transfer_syntax_uid="1.2.840.10008.1.2.1",
    )
    sc.PatientOrientation = None
    sc.Laterality = None  # both breasts: General Series Laterality is Type 2C, present and empty
    return _finish(sc, "AI summary (mammonode)", sources)

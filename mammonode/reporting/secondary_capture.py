"""Secondary Capture images (highdicom): one heatmap overlay per view, and the summary.

Secondary Capture is the one image type every PACS viewer shows. Each overlay keeps the
source mammogram's orientation and pixel geometry (Pixel Spacing copied) so it can be read
beside the original; labels are burned in and BurnedInAnnotation says so. Heatmap SCs are
filed one series per breast, since Laterality is a series attribute. Every SC carries the
source's patient and study attributes (one study in the archive, not two that disagree) and
is compressed as ``[results] sc_compression`` says.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
)

from mammonode import __version__
from mammonode.exam.orientation import Frame, Orientation
from mammonode.exam.views import VIEWS, laterality
from mammonode.pipeline.registry import spec
from mammonode.pipeline.run import PipelineResult
from mammonode.reporting.content import density_lines, imagewise_lines, missing_views, partial_notices, score_table
from mammonode.reporting.render import (
    NOT_FOR_DIAGNOSIS,
    TEST_NOTICE_BURNED,
    OverlayLabels,
    SummaryPanel,
    SummaryText,
    annotated_overlay,
    grey8,
    overlay,
    summary_image,
)

MANUFACTURER = "mammonode"
SERIES_NUMBERS = {
    "sr": 9100,
    "heatmap-malignant-R": 9101,
    "heatmap-malignant-L": 9102,
    "summary": 9103,
    "heatmap-benign-R": 9105,
    "heatmap-benign-L": 9106,
    "pm-malignant": 9107,
}
# (121322, DCM, "Source image for image processing operation"): CID 7202, the purpose of
# every Source Image Sequence item of a derived image.
SOURCE_PURPOSE = ("121322", "DCM", "Source image for image processing operation")
DERIVATION = "AI result rendered by mammonode; not for primary diagnosis"
# Transfer syntax and the photometric interpretation each codec stores RGB in (PS3.5 8.2).
COMPRESSION = {
    "none": (ExplicitVRLittleEndian, "RGB"),
    "rle": (RLELossless, "RGB"),
    "jpegls": (JPEGLSLossless, "RGB"),
    "jpeg2000": (JPEG2000Lossless, "YBR_RCT"),
    "jpeg": (JPEGBaseline8Bit, "YBR_FULL_422"),
}


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


def overlay_pixels(
    result: PipelineResult, source: SourceImage, kind: str = "malignant", threshold: float = 0.5
) -> np.ndarray:
    """The full-resolution heatmap SC picture of one view, labels burned in."""
    labels = OverlayLabels(
        view=source.view,
        model=spec("patch").title,
        test_weights=result.test_weights,
        heatmap_kind=kind,
        threshold=threshold,
    )
    return annotated_overlay(
        grey8(source.grey),
        heatmap_as_stored(result, source, kind),
        source.orientation.faces_right(Frame.STORED),
        labels,
    )


# --- the summary's content ----------------------------------------------------------------


def _date(value: object) -> str:
    text = str(value or "")
    return f"{text[:4]}-{text[4:6]}-{text[6:8]}" if len(text) >= 8 else text or "-"


def _time(value: object) -> str:
    text = str(value or "")
    return f"{text[:2]}:{text[2:4]}" if len(text) >= 4 else text


def _person(value: object) -> str:
    """``FAMILY^GIVEN^MIDDLE^PREFIX^SUFFIX`` (first component group) as "FAMILY, GIVEN MIDDLE"."""
    parts = str(value or "").split("=")[0].split("^")
    rest = " ".join(p for p in parts[1:] if p)
    return f"{parts[0]}, {rest}" if rest else parts[0] or "-"


def identity_lines(result: PipelineResult, ds: Dataset, analysed_at: datetime) -> list[str]:
    """Who, which study, when analysed, by which software and weights: a PACS object must say
    whom it belongs to (burned in; never logged)."""
    lines = [
        f"{_person(ds.get('PatientName'))}   ID {ds.get('PatientID', '') or '-'}",
        f"born {_date(ds.get('PatientBirthDate'))}   sex {ds.get('PatientSex', '') or '-'}"
        f"   age {ds.get('PatientAge', '') or '-'}",
        f"study {_date(ds.get('StudyDate'))} {_time(ds.get('StudyTime'))}"
        f"   accession {ds.get('AccessionNumber', '') or '-'}",
        f"analysed {analysed_at:%Y-%m-%d %H:%M}   mammonode {result.software_version}",
    ]
    for name, prov in result.models.items():
        flag = "TEST WEIGHTS" if prov.test_weights else ("verified" if prov.verified else "unverified")
        lines.append(f"  {spec(name).short_title}: weights {prov.sha256[:12]} {flag}")
    return lines


def summary_panel(result: PipelineResult, source: SourceImage, threshold: float) -> SummaryPanel:
    """A view on the summary: the overlay without its full-resolution labels (the summary
    draws its own at screen scale), captioned with the heatmap's maximum."""
    heatmap = heatmap_as_stored(result, source, "malignant")
    pixels = overlay(grey8(source.grey), heatmap, threshold)
    scores = imagewise_lines(result, source.view)
    if heatmap is None or not np.isfinite(heatmap).any():
        return SummaryPanel(pixels, "no heatmap", scores)
    return SummaryPanel(pixels, f"heatmap max {100 * float(np.nanmax(heatmap)):.0f} %", scores)


def summary_pixels(
    result: PipelineResult, sources: dict[str, SourceImage], threshold: float, analysed_at: datetime
) -> np.ndarray:
    panels = {view: summary_panel(result, sources[view], threshold) for view in VIEWS if view in sources}
    notices = partial_notices(result) + [NOT_FOR_DIAGNOSIS] + ([TEST_NOTICE_BURNED] if result.test_weights else [])
    reference = sources[next(v for v in VIEWS if v in sources)].dataset
    text = SummaryText(
        identity=identity_lines(result, reference, analysed_at),
        table=score_table(result),
        density=density_lines(result),
        notices=notices,
        threshold=threshold,
        missing=missing_views(result),
    )
    return summary_image(panels, text)


# --- the DICOM objects --------------------------------------------------------------------


def series_description(what: str, test_weights: bool) -> str:
    return f"{what} (mammonode)" + (" - TEST WEIGHTS" if test_weights else "")


def source_image_items(sources: Sequence[Dataset]) -> list[Dataset]:
    """Source Image Sequence items, each with its Purpose of Reference."""
    items = []
    for src in sources:
        purpose = Dataset()
        purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = SOURCE_PURPOSE
        item = Dataset()
        item.ReferencedSOPClassUID = src.SOPClassUID
        item.ReferencedSOPInstanceUID = src.SOPInstanceUID
        item.PurposeOfReferenceCodeSequence = [purpose]
        items.append(item)
    return items


def _orientation(ds: Dataset) -> list[str] | None:
    value = list(ds.get("PatientOrientation", []) or [])
    return [str(value[0]), str(value[1])] if len(value) == 2 and value[0] and value[1] else None


def _lossy(sources: Sequence[Dataset], compression: str, sc: Dataset, raw_bytes: int) -> None:
    """Lossy Image Compression: "01" once any step was lossy (ours or the source's), with our
    ratio and method when it was ours (PS3.3 C.7.6.1.1.5)."""
    source_lossy = any(str(s.get("LossyImageCompression", "00")) == "01" for s in sources)
    if compression != "jpeg":
        sc.LossyImageCompression = "01" if source_lossy else "00"
        return
    sc.LossyImageCompression = "01"
    ratio = raw_bytes / max(1, len(sc.PixelData))
    sc.LossyImageCompressionRatio = f"{ratio:.1f}"
    sc.LossyImageCompressionMethod = "ISO_10918_1"


def _finish(sc: Dataset, description: str, sources: Sequence[Dataset], compression: str, raw_bytes: int) -> Dataset:
    sc.copy_patient_and_study_information(sources[0])
    if "SpecificCharacterSet" in sources[0]:
        sc.SpecificCharacterSet = sources[0].SpecificCharacterSet
    sc.BurnedInAnnotation = "YES"
    sc.ConversionType = "WSD"  # made by a workstation from other images, not digitised
    sc.SeriesDescription = description
    sc.SoftwareVersions = __version__
    sc.DerivationDescription = DERIVATION
    sc.SourceImageSequence = source_image_items(sources)
    _lossy(sources, compression, sc, raw_bytes)
    return sc


def heatmap_sc(
    source: SourceImage,
    pixels: np.ndarray,
    kind: str,
    series_uid: str,
    sop_uid: str,
    instance_number: int,
    compression: str = "jpeg2000",
    test_weights: bool = False,
) -> Dataset:
    spacing = source.dataset.get("PixelSpacing") or source.dataset.get("ImagerPixelSpacing")
    orientation = _orientation(source.dataset)
    side = laterality(source.view)
    syntax, photometric = COMPRESSION[compression]
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source.dataset,
        pixel_array=pixels,
        photometric_interpretation=photometric,
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_uid,
        series_number=SERIES_NUMBERS[f"heatmap-{kind}-{side}"],
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        pixel_spacing=(float(spacing[0]), float(spacing[1])) if spacing else None,
        laterality=side,
        # highdicom takes one letter per direction; the full value (e.g. "FR") is copied below.
        patient_orientation=tuple(v[0] for v in orientation) if orientation else None,
        transfer_syntax_uid=syntax,
    )
    if orientation:
        sc.PatientOrientation = orientation
    breast = "right" if side == "R" else "left"
    description = series_description(f"AI {kind} heatmap, {breast} breast", test_weights)
    return _finish(sc, description, [source.dataset], compression, pixels.nbytes)


def summary_sc(
    pixels: np.ndarray,
    reference: Dataset,
    sources: list[Dataset],
    series_uid: str,
    sop_uid: str,
    compression: str = "jpeg2000",
    test_weights: bool = False,
    analysed_at: datetime | None = None,
) -> Dataset:
    """The summary (four views, or the views present for a partial result). A composite of
    both breasts says so with Image Laterality B (both; one breast's views: L or R), which
    also lifts General Series Laterality's condition (no series Laterality rather than an
    empty one); it has no one orientation, so Patient Orientation (Type 2C) is empty.
    Content Date/Time is the analysis time burned into the picture."""
    syntax, photometric = COMPRESSION[compression]
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=reference,
        pixel_array=pixels,
        photometric_interpretation=photometric,
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_uid,
        series_number=SERIES_NUMBERS["summary"],
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        patient_orientation=("A", "R"),  # removed below: a composite of four views has no one orientation
        transfer_syntax_uid=syntax,
    )
    sc.PatientOrientation = None
    if "Laterality" in sc:
        del sc.Laterality
    # A partial result of one breast (two views of the remaining breast) is that breast's.
    sides = {str(s.get("ImageLaterality", "")) for s in sources}
    sc.ImageLaterality = sides.pop() if len(sides) == 1 and sides <= {"L", "R"} else "B"
    if analysed_at is not None:
        sc.ContentDate = analysed_at.strftime("%Y%m%d")
        sc.ContentTime = analysed_at.strftime("%H%M%S")
    return _finish(sc, series_description("AI summary", test_weights), sources, compression, pixels.nbytes)

"""Each view's malignant heatmap as a Parametric Map: IHE AIR's carrier for a probability map,
which AI-ready viewers overlay on the mammogram with their own colour map.

Three facts fix the encoding. A mammogram has no Frame of Reference, so a map derived from it
relates to it pixel for pixel only: same matrix (highdicom enforces it). Float pixel data has
no DICOM image codec (only Deflate, which dicom3tools cannot read), so a float32 map of a
2600 x 2000 mammogram is 21 MB a view, 83 MB an exam. A Parametric Map may hold integers
(PS3.3 A.75.1) with a Real World Value Mapping to the real values: so each map holds
P(malignant) in hundredths of a percent (uint16, 0-10000), mapped to 0-100 % (UCUM "%") by
slope 0.01, compressed losslessly, a few hundred kilobytes. The real-world values are the
heatmap's to 0.005 %.

The Parametric Map IOD also requires a Frame of Reference and plane position/orientation
(dciodvfy errors without them), which a projection mammogram does not have. Each map gets a
Frame of Reference of its own, which no other object shares, with a nominal plane: origin at
the first pixel, rows and columns along the source's Patient Orientation, the source's pixel
spacing. It locates nothing; the map relates to its mammogram through the Derivation Image
Sequence, pixel for pixel (Spatial Locations Preserved YES).
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from highdicom.sr.coding import CodedConcept
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless

from mammonode import __version__
from mammonode.exam.views import laterality
from mammonode.pipeline.registry import spec
from mammonode.pipeline.run import PipelineResult
from mammonode.reporting.secondary_capture import (
    MANUFACTURER,
    SERIES_NUMBERS,
    SourceImage,
    heatmap_as_stored,
    series_description,
    source_image_items,
)

PERCENT = CodedConcept("%", "UCUM", "Percent")
BREAST = CodedConcept("76752008", "SCT", "Breast")
CONTENT_LABEL = "P_MALIGNANT"
FRAME_LABEL = 0x00209453  # (0020,9453) Frame Label
STEPS_PER_PERCENT = 100  # stored value = P(malignant) in 1/100 %
FULL_SCALE = 100 * STEPS_PER_PERCENT
# The lossless codec of each [results] sc_compression; lossy JPEG never touches measured values.
TRANSFER_SYNTAX = {
    "none": ExplicitVRLittleEndian,
    "rle": RLELossless,
    "jpegls": JPEGLSLossless,
    "jpeg2000": JPEG2000Lossless,
    "jpeg": JPEG2000Lossless,
}


class _ParametricMap(hd.pm.ParametricMap):
    """highdicom's Parametric Map, for sources without a Frame of Reference.

    highdicom 0.28 gives such a map a Frame Label dimension (its Dimension Index Sequence) but
    fills neither the frame's Frame Label nor its Dimension Index Values, and then fails on
    its own frame index. The one frame is labelled here, before that index is built."""

    def _build_luts(self) -> None:
        pointers = [item.DimensionIndexPointer for item in self.get("DimensionIndexSequence", [])]
        if pointers == [FRAME_LABEL]:
            for frame in self.get("PerFrameFunctionalGroupsSequence", []):
                content = frame.FrameContentSequence[0]
                if not content.get("DimensionIndexValues"):
                    content.FrameLabel = CONTENT_LABEL
                    content.DimensionIndexValues = [1]
        super()._build_luts()


def stored_values(result: PipelineResult, source: SourceImage) -> np.ndarray | None:
    """The malignant heatmap in the stored frame of the source, in 1/100 % (uint16); 0 outside
    the analysed breast window (background). None when the patch model did not run."""
    heatmap = heatmap_as_stored(result, source, "malignant")
    if heatmap is None:
        return None
    scaled = np.rint(np.clip(np.nan_to_num(heatmap, nan=0.0), 0.0, 1.0) * FULL_SCALE)
    return np.ascontiguousarray(scaled, dtype=np.uint16)


# Patient Orientation letters as LPS unit vectors (PS3.3 C.7.6.1.1.1).
DIRECTIONS = {
    "L": (1.0, 0.0, 0.0),
    "R": (-1.0, 0.0, 0.0),
    "P": (0.0, 1.0, 0.0),
    "A": (0.0, -1.0, 0.0),
    "H": (0.0, 0.0, 1.0),
    "F": (0.0, 0.0, -1.0),
}


def _direction(letters: str) -> np.ndarray | None:
    if not letters or any(c not in DIRECTIONS for c in letters):
        return None
    vector = np.sum([DIRECTIONS[c] for c in letters], axis=0)
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm else None


def nominal_orientation(ds: Dataset) -> list[float]:
    """Image Orientation (Patient) of the map's nominal plane: row and column directions from
    the source's Patient Orientation (e.g. A\\FR), else the identity orientation."""
    value = [str(v).strip().upper() for v in (ds.get("PatientOrientation") or [])]
    if len(value) == 2:
        row, column = _direction(value[0]), _direction(value[1])
        if row is not None and column is not None and abs(float(row @ column)) < 1e-6:
            return [round(float(v), 6) for v in (*row, *column)]
    return [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def _nominal_geometry(pm: Dataset, source: Dataset, frame_of_reference_uid: str) -> None:
    pm.FrameOfReferenceUID = frame_of_reference_uid
    pm.PositionReferenceIndicator = ""
    orientation = Dataset()
    orientation.ImageOrientationPatient = nominal_orientation(source)
    pm.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence = [orientation]
    for frame in pm.PerFrameFunctionalGroupsSequence:
        position = Dataset()
        position.ImagePositionPatient = [0.0, 0.0, 0.0]
        frame.PlanePositionSequence = [position]


def _frame_anatomy(view: str) -> Dataset:
    """Frame Anatomy (Type 1 in the Parametric Map's functional groups): breast and which one."""
    region = Dataset()
    region.CodeValue = BREAST.value
    region.CodingSchemeDesignator = BREAST.scheme_designator
    region.CodeMeaning = BREAST.meaning
    item = Dataset()
    item.AnatomicRegionSequence = [region]
    item.FrameLaterality = laterality(view)
    return item


def parametric_map(
    result: PipelineResult,
    source: SourceImage,
    series_uid: str,
    sop_uid: str,
    instance_number: int,
    frame_of_reference_uid: str,
    device_serial_number: str = "mammonode",
    compression: str = "jpeg2000",
) -> hd.pm.ParametricMap | None:
    """The Parametric Map of ``source``'s malignant heatmap, or None without a heatmap."""
    values = stored_values(result, source)
    if values is None:
        return None
    patch = spec("patch").title
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=CONTENT_LABEL,
        lut_explanation=f"P(malignant) per pixel, {patch}"[:64],
        unit=PERCENT,
        value_range=(0, FULL_SCALE),
        slope=1.0 / STEPS_PER_PERCENT,
        intercept=0.0,
    )
    pm = _ParametricMap(
        source_images=[source.dataset],
        pixel_array=values,
        series_instance_uid=series_uid,
        series_number=SERIES_NUMBERS["pm-malignant"],
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MANUFACTURER,
        software_versions=__version__,
        device_serial_number=device_serial_number,
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=FULL_SCALE / 2, window_width=FULL_SCALE)],
        transfer_syntax_uid=TRANSFER_SYNTAX[compression],
        content_label=CONTENT_LABEL,
        content_description=f"Malignant heatmap {source.view}"[:64],
        # Not a cleared product: every map says research, whatever its weights.
        content_qualification=hd.ContentQualificationValues.RESEARCH,
        image_flavor=hd.pm.ImageFlavorValues.STATIC,
        derived_pixel_contrast=hd.pm.DerivedPixelContrastValues.QUANTITY,
    )
    pm.SharedFunctionalGroupsSequence[0].FrameAnatomySequence = [_frame_anatomy(source.view)]
    _nominal_geometry(pm, source.dataset, frame_of_reference_uid)
    pm.SourceImageSequence = source_image_items([source.dataset])
    pm.SeriesDescription = series_description("AI malignant heatmap, parametric map", result.test_weights)
    pm.DerivationDescription = (
        f"{patch}: P(malignant) of 256x256 patches averaged over overlapping patches, "
        "0-100 % (0 outside the analysed breast region); not for primary diagnosis"
    )[:1024]
    return pm

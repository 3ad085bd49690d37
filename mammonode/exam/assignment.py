"""Which of the four screening views an MG instance is, from its header alone.

Laterality from Image Laterality (fallback: series Laterality); view from the View Code
Sequence (SNOMED CT 399162004 cranio-caudal, 399368009 medio-lateral oblique, or the old SRT
codes R-10242 / R-10226), falling back to View Position. A view modifier (spot compression,
magnification, implant displaced, ...) or any other view makes the image "other". For
Processing images and tomosynthesis are recorded but never pipeline inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset

from mammonode.exam.orientation import mirrored_per_header

MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
MG_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.2.1"
BREAST_TOMOSYNTHESIS = "1.2.840.10008.5.1.4.1.1.13.1.3"
BREAST_PROJECTION_PRESENTATION = "1.2.840.10008.5.1.4.1.1.13.1.4"
BREAST_PROJECTION_PROCESSING = "1.2.840.10008.5.1.4.1.1.13.1.5"

_VIEW_CODES = {
    ("SCT", "399162004"): "CC",
    ("SRT", "R-10242"): "CC",
    ("SNM3", "R-10242"): "CC",
    ("SCT", "399368009"): "MLO",
    ("SRT", "R-10226"): "MLO",
    ("SNM3", "R-10226"): "MLO",
}
OTHER = "other"


@dataclass(frozen=True)
class ViewAssignment:
    view: str  # L-CC, R-CC, L-MLO, R-MLO or "other"
    usable: bool  # may be chosen as pipeline input
    reason: str  # why it is "other" or not usable; "" when usable
    mirrored: bool | None  # stored mirrored, per Patient Orientation; None when it does not say


def _view_from_code(ds: Dataset) -> tuple[str | None, str]:
    seq = ds.get("ViewCodeSequence")
    if not seq:
        return None, ""
    item = seq[0]
    code = (str(item.get("CodingSchemeDesignator", "")).upper(), str(item.get("CodeValue", "")))
    if item.get("ViewModifierCodeSequence"):
        meaning = item.ViewModifierCodeSequence[0].get("CodeMeaning", "view modifier")
        return OTHER, f"view modifier: {meaning}"
    view = _VIEW_CODES.get(code)
    if view is None:
        return OTHER, f"view code {code[0]} {code[1]} ({item.get('CodeMeaning', '')}) is not CC or MLO"
    return view, ""


def _view_from_position(ds: Dataset) -> str | None:
    position = str(ds.get("ViewPosition", "")).strip().upper()
    return position if position in ("CC", "MLO") else None


def _laterality(ds: Dataset) -> str | None:
    for keyword in ("ImageLaterality", "Laterality"):
        value = str(ds.get(keyword, "")).strip().upper()
        if value in ("L", "R"):
            return value
    return None


def assign_view(ds: Dataset) -> ViewAssignment:
    sop_class = str(ds.get("SOPClassUID", ""))
    modality = str(ds.get("Modality", "")).upper()
    if modality != "MG" and sop_class not in (MG_FOR_PRESENTATION, MG_FOR_PROCESSING):
        return ViewAssignment(OTHER, False, f"modality {modality or 'unknown'} is not MG", None)
    laterality = _laterality(ds)
    code_view, reason = _view_from_code(ds)
    position_view = _view_from_position(ds)
    if code_view == OTHER:
        return ViewAssignment(OTHER, False, reason, None)
    if code_view and position_view and code_view != position_view:
        return ViewAssignment(
            OTHER, False, f"View Code Sequence says {code_view} but View Position says {position_view}", None
        )
    angle = code_view or position_view
    if laterality is None:
        return ViewAssignment(OTHER, False, "no Image Laterality or Laterality", None)
    if angle is None:
        return ViewAssignment(OTHER, False, "no CC/MLO view code or view position", None)
    view = f"{laterality}-{angle}"
    mirrored = mirrored_per_header(view, ds)
    if sop_class in (BREAST_TOMOSYNTHESIS, BREAST_PROJECTION_PRESENTATION, BREAST_PROJECTION_PROCESSING):
        return ViewAssignment(view, False, "tomosynthesis / breast projection image", mirrored)
    intent = str(ds.get("PresentationIntentType", "")).upper()
    if sop_class == MG_FOR_PROCESSING or intent == "FOR PROCESSING":
        return ViewAssignment(view, False, "For Processing image", mirrored)
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        return ViewAssignment(view, False, "multi-frame image", mirrored)
    return ViewAssignment(view, True, "", mirrored)

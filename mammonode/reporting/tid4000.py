"""The Mammography CAD SR (SOP class 1.2.840.10008.5.1.4.1.1.88.50, TID 4000), on pydicom.

What mammography workstations read as CAD. Neither highdicom nor pydicom builds TID 4000, so
this module builds the document from mammonode's own typed content tree (``sr_tree``):

  Mammography CAD Report
    Language: English
    Image Library: the four mammograms (TID 4020: laterality, view, orientation, dates,
                   pixel spacing, size)
    CAD Processing and Findings Summary (honest: a selected model that did not run means
    "Not all algorithms succeeded")
      per breast: Individual Impression/Recommendation
        Composite Feature "Selected region": the ensemble's Probability of cancer (%), its
        algorithm, inferred from one Single Image Finding per view (Not for Presentation:
        the centre of the analysed region is not a lesion mark)
      density: Individual Impression/Recommendation with one Breast composition Single Image
        Finding per image (TID 4007, HAS PROPERTIES; no geometry for this finding type)
    Summary of Detections / Summary of Analyses: each algorithm with its images (by reference)

No lesion marks: the models do not detect lesions. Per-model probabilities, P(benign) and the
class probabilities have no place in TID 4000 (not extensible); they stay in the TID 1500 SR.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.coding import Code
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

from mammonode.exam.assignment import assign_view
from mammonode.exam.orientation import Frame
from mammonode.pipeline.registry import CANCER_MODELS, DENSITY_MODELS
from mammonode.pipeline.run import PipelineResult
from mammonode.reporting import codes
from mammonode.reporting.content import (
    ENSEMBLE,
    ENSEMBLE_TITLE,
    Algorithm,
    algorithm,
    all_algorithms,
    density_call,
    ensemble_algorithm,
    malignancy_score,
    not_run_algorithm,
    percent,
)
from mammonode.reporting.header import (
    MANUFACTURER,
    PREDICT_EQUIPMENT,
    Equipment,
    contributing_equipment,
    hierarchical_references,
    performed_procedure_codes,
    referenced_requests,
    set_equipment,
)
from mammonode.reporting.sr_tree import (
    CONTAINS,
    HAS_ACQ_CONTEXT,
    HAS_CONCEPT_MOD,
    HAS_PROPERTIES,
    INFERRED_FROM,
    SELECTED_FROM,
    CodeItem,
    Container,
    DateItem,
    ImageItem,
    Item,
    Node,
    NumItem,
    Reference,
    ScoordItem,
    TextItem,
    TimeItem,
    encode,
)

SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.88.50"  # Mammography CAD SR Storage
SERIES_NUMBER = 9104
SERIES_DESCRIPTION = "Mammography CAD SR (mammonode)"

# --- TID 4000 content ------------------------------------------------------------------------


@dataclass
class _View:
    view: str  # e.g. "L-CC"
    header: Dataset
    entry: ImageItem  # its Image Library entry


def _algorithm(algo: Algorithm) -> list[Item]:
    """TID 4019, HAS PROPERTIES as every TID 4000 finding, detection and analysis has it."""
    items: list[Item] = [
        TextItem(rel=HAS_PROPERTIES, name=codes.ALGORITHM_NAME, value=algo.name),
        TextItem(rel=HAS_PROPERTIES, name=codes.ALGORITHM_VERSION, value=algo.version),
    ]
    items += [TextItem(rel=HAS_PROPERTIES, name=codes.ALGORITHM_PARAMETERS, value=p) for p in algo.parameters]
    return items


def _intent(code: Code) -> CodeItem:
    return CodeItem(rel=HAS_CONCEPT_MOD, name=codes.RENDERING_INTENT, value=code)


def _library_entry(view: str, ds: Dataset) -> ImageItem:
    """TID 4020. Pixel spacing is Imager Pixel Spacing (the detector plane, as the TID 1500
    SR's library gives it), else Pixel Spacing."""
    side, angle = view.split("-", 1)
    children: list[Item] = [
        CodeItem(rel=HAS_ACQ_CONTEXT, name=codes.IMAGE_LATERALITY, value=codes.BREAST_SIDE[side]),
        CodeItem(rel=HAS_ACQ_CONTEXT, name=codes.IMAGE_VIEW, value=codes.VIEW[angle]),
    ]
    orientation = list(ds.get("PatientOrientation", []) or [])
    if len(orientation) == 2 and orientation[0] and orientation[1]:
        children += [
            TextItem(rel=HAS_ACQ_CONTEXT, name=codes.PATIENT_ORIENTATION_ROW, value=str(orientation[0])),
            TextItem(rel=HAS_ACQ_CONTEXT, name=codes.PATIENT_ORIENTATION_COLUMN, value=str(orientation[1])),
        ]
    for name, keyword, kind in (
        (codes.STUDY_DATE, "StudyDate", DateItem),
        (codes.STUDY_TIME, "StudyTime", TimeItem),
        (codes.CONTENT_DATE, "ContentDate", DateItem),
        (codes.CONTENT_TIME, "ContentTime", TimeItem),
    ):
        if ds.get(keyword):
            children.append(kind(rel=HAS_ACQ_CONTEXT, name=name, value=str(ds.get(keyword))))
    spacing = ds.get("ImagerPixelSpacing") or ds.get("PixelSpacing")
    if spacing:
        children += [
            NumItem(
                rel=HAS_ACQ_CONTEXT, name=codes.HORIZONTAL_PIXEL_SPACING, value=float(spacing[1]), unit=codes.MILLIMETER
            ),
            NumItem(
                rel=HAS_ACQ_CONTEXT, name=codes.VERTICAL_PIXEL_SPACING, value=float(spacing[0]), unit=codes.MILLIMETER
            ),
        ]
    children += [
        NumItem(rel=HAS_ACQ_CONTEXT, name=codes.PIXEL_DATA_ROWS, value=int(ds.Rows), unit=codes.PIXELS),
        NumItem(rel=HAS_ACQ_CONTEXT, name=codes.PIXEL_DATA_COLUMNS, value=int(ds.Columns), unit=codes.PIXELS),
    ]
    return ImageItem(
        rel=CONTAINS, sop_class_uid=str(ds.SOPClassUID), sop_instance_uid=str(ds.SOPInstanceUID), children=children
    )


def _region(result: PipelineResult, view: _View) -> tuple[tuple[float, float], list[tuple[float, float]]]:
    """The analysed region (the breast crop window) in the stored image: centre and outline."""
    top, bottom, left, right = result.views[view.view].crop.window_location  # as acquired
    if result.views[view.view].orientation.flips(Frame.ACQUIRED, Frame.STORED):
        width = int(view.header.Columns)
        left, right = width - right, width - left
    corners = [(left, top), (right, top), (right, bottom), (left, bottom), (left, top)]
    return ((left + right) / 2, (top + bottom) / 2), [(float(x), float(y)) for x, y in corners]


def _selected_region(result: PipelineResult, view: _View, side: str, algo: Algorithm) -> CodeItem:
    """TID 4006 for one view of one breast: the whole breast, analysed (Not for Presentation)."""
    center, outline = _region(result, view)
    angle = view.view.split("-", 1)[1]
    return CodeItem(
        rel=INFERRED_FROM,
        name=codes.SINGLE_IMAGE_FINDING,
        value=codes.SELECTED_REGION,
        children=[
            _intent(codes.NOT_FOR_PRESENTATION),
            *_algorithm(algo),
            ScoordItem(
                rel=HAS_PROPERTIES,
                name=codes.CENTER,
                graphic_type="POINT",
                points=[center],
                children=[Reference(SELECTED_FROM, view.entry)],
            ),
            ScoordItem(
                rel=HAS_PROPERTIES,
                name=codes.OUTLINE,
                graphic_type="POLYLINE",
                points=outline,
                children=[Reference(SELECTED_FROM, view.entry)],
            ),
            TextItem(
                rel=HAS_PROPERTIES,
                name=codes.SELECTED_REGION_DESCRIPTION,
                value=f"whole {side} breast, {angle} view, analysed for malignancy",
            ),
        ],
    )


def _breast_impression(result: PipelineResult, views: list[_View], side: str, algo: Algorithm) -> Container:
    """TID 4003-4005: one Composite Feature carrying the ensemble's likelihood for a breast."""
    feature = CodeItem(
        rel=CONTAINS,
        name=codes.COMPOSITE_FEATURE,
        value=codes.SELECTED_REGION,
        children=[
            _intent(codes.PRESENTATION_REQUIRED),
            CodeItem(rel=HAS_PROPERTIES, name=codes.COMPOSITE_TYPE, value=codes.RELATED_SPATIALLY),
            CodeItem(rel=HAS_PROPERTIES, name=codes.SCOPE_OF_FEATURE, value=codes.ON_MULTIPLE_IMAGES),
            *_algorithm(algo),
            NumItem(
                rel=HAS_PROPERTIES,
                name=codes.PROBABILITY_OF_CANCER,
                value=percent(malignancy_score(result, side)),
                unit=codes.PERCENT,
            ),
            *[_selected_region(result, v, side, algo) for v in views],
        ],
    )
    return Container(
        rel=INFERRED_FROM,
        name=codes.INDIVIDUAL_IMPRESSION,
        children=[_intent(codes.PRESENTATION_REQUIRED), feature],
    )


def _density_impression(category: str, views: list[_View], algo: Algorithm) -> Container:
    """TID 4006 + 4007 per image. TID 4007 is included HAS PROPERTIES: the IOD forbids CODE
    CONTAINS CODE (DCMTK refuses it), though PixelMed's table expects CONTAINS."""
    findings = [
        CodeItem(
            rel=CONTAINS,
            name=codes.SINGLE_IMAGE_FINDING,
            value=codes.BREAST_COMPOSITION,
            children=[
                _intent(codes.PRESENTATION_REQUIRED),
                *_algorithm(algo),
                CodeItem(rel=HAS_PROPERTIES, name=codes.BREAST_COMPOSITION, value=codes.COMPOSITION[category]),
            ],
        )
        for _ in views
    ]
    return Container(
        rel=INFERRED_FROM, name=codes.INDIVIDUAL_IMPRESSION, children=[_intent(codes.PRESENTATION_REQUIRED), *findings]
    )


@dataclass
class _Run:
    """One algorithm's outcome, as the Summary of Detections/Analyses lists it."""

    value: Code  # what was detected or analysed (CID 6014 / CID 6043)
    algo: Algorithm
    succeeded: bool


def _runs(result: PipelineResult) -> tuple[list[_Run], list[_Run]]:
    """Every selected model detected and analysed (CID 6014 / CID 6043 values by model kind);
    one that did not run failed both. The ensemble is one more analysis, failed when none of
    its members ran. Detections and analyses therefore always share one outcome."""
    selected = set(result.models) | set(result.skipped)
    detections, analyses = [], []
    for model in (*CANCER_MODELS, *DENSITY_MODELS):
        if model not in selected:
            continue
        ran = model in result.models
        algo = algorithm(result, model) if ran else not_run_algorithm(result, model)
        cancer = model in CANCER_MODELS
        detections.append(_Run(codes.SELECTED_REGION if cancer else codes.BREAST_COMPOSITION, algo, ran))
        analyses.append(_Run(codes.IMPRESSION_ANALYSIS if cancer else codes.BREAST_COMPOSITION_ANALYSIS, algo, ran))
    cancer_selected = [m for m in CANCER_MODELS if m in selected]
    if cancer_selected:
        ensemble = ensemble_algorithm(result)
        algo = ensemble or Algorithm(ENSEMBLE, ENSEMBLE_TITLE, result.software_version, ())
        analyses.append(_Run(codes.IMPRESSION_ANALYSIS, algo, ensemble is not None))
    return detections, analyses


def _outcome(runs: list[_Run]) -> Code:
    if not runs:
        return codes.OUTCOME["not attempted"]
    ok = sum(r.succeeded for r in runs)
    return codes.OUTCOME["succeeded" if ok == len(runs) else ("failed" if ok == 0 else "partially")]


def _summary(
    name: Code, runs: list[_Run], views: list[_View], succeeded: Code, failed: Code, performed: Code
) -> CodeItem:
    """TID 4015-4018: the outcome, then Successful/Failed containers of performed items, each
    with its algorithm and the images it analysed (or was to), by reference."""
    children: list[Node] = []
    for container, ok in ((succeeded, True), (failed, False)):
        chosen = [r for r in runs if r.succeeded == ok]
        if not chosen:
            continue
        items = [
            CodeItem(
                rel=CONTAINS,
                name=performed,
                value=r.value,
                children=[*_algorithm(r.algo), *[Reference(HAS_PROPERTIES, v.entry) for v in views]],
            )
            for r in chosen
        ]
        children.append(Container(rel=INFERRED_FROM, name=container, children=items))
    return CodeItem(rel=CONTAINS, name=name, value=_outcome(runs), children=children)


def content_tree(result: PipelineResult, sources: Sequence[Dataset]) -> Container:
    views = [_View(view, ds, _library_entry(view, ds)) for ds in sources for view in [assign_view(ds).view]]
    library = Container(rel=CONTAINS, name=codes.IMAGE_LIBRARY, children=[v.entry for v in views])
    impressions: list[Item] = []
    ensemble = ensemble_algorithm(result)
    if ensemble is not None:
        for side, letter in (("right", "R"), ("left", "L")):
            side_views = [v for v in views if v.view.startswith(letter)]
            impressions.append(_breast_impression(result, side_views, side, ensemble))
    call = density_call(result)
    if call is not None:
        impressions.append(_density_impression(call.category, views, algorithm(result, call.model)))
    detections, analyses = _runs(result)
    everything = detections + analyses
    all_ok = all(r.succeeded for r in everything)
    any_ok = any(r.succeeded for r in everything)
    summary = codes.CAD_SUMMARY_VALUE[(all_ok and any_ok, any_ok, any_ok and bool(impressions))]
    return Container(
        rel="",
        name=codes.MAMMOGRAPHY_CAD_REPORT,
        children=[
            CodeItem(rel=HAS_CONCEPT_MOD, name=codes.LANGUAGE, value=codes.ENGLISH),
            library,
            CodeItem(rel=CONTAINS, name=codes.CAD_SUMMARY, value=summary, children=impressions),
            _summary(
                codes.SUMMARY_OF_DETECTIONS,
                detections,
                views,
                codes.SUCCESSFUL_DETECTIONS,
                codes.FAILED_DETECTIONS,
                codes.DETECTION_PERFORMED,
            ),
            _summary(
                codes.SUMMARY_OF_ANALYSES,
                analyses,
                views,
                codes.SUCCESSFUL_ANALYSES,
                codes.FAILED_ANALYSES,
                codes.ANALYSIS_PERFORMED,
            ),
        ],
    )


# --- the document ----------------------------------------------------------------------------

_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "StudyDescription",
)
_TYPE_2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime")
_TYPE_2 += ("ReferringPhysicianName", "StudyID", "AccessionNumber")


def build_cad_sr(
    result: PipelineResult,
    sources: Sequence[Dataset],
    series_uid: str,
    sop_uid: str,
    *,
    equipment: Equipment = PREDICT_EQUIPMENT,
    now: datetime.datetime | None = None,
) -> Dataset:
    """The CAD SR of a study version. ``sources``: the four mammograms (headers). Always built;
    whether it may be sent with test or unverified weights is the delivery side's decision."""
    now = now or datetime.datetime.now()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SOP_CLASS_UID
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    # The source's character set: every text of ours is ASCII, the patient's names are theirs.
    if "SpecificCharacterSet" in sources[0]:
        ds.SpecificCharacterSet = sources[0].SpecificCharacterSet
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    ds.SOPClassUID = SOP_CLASS_UID
    ds.SOPInstanceUID = sop_uid
    first = sources[0]
    for keyword in _PATIENT_STUDY:
        if keyword in first:
            setattr(ds, keyword, first.data_element(keyword).value)
        elif keyword in _TYPE_2:
            setattr(ds, keyword, "")
    ds.Modality = "SR"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = SERIES_NUMBER
    ds.SeriesDescription = SERIES_DESCRIPTION + (
        " - TEST WEIGHTS" if result.test_weights else (" - UNVERIFIED WEIGHTS" if result.unverified_weights else "")
    )
    ds.ReferencedPerformedProcedureStepSequence = []
    set_equipment(ds, result.software_version, equipment)
    ds.Manufacturer = MANUFACTURER
    ds.InstanceNumber = 1
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.ContentDate = ds.InstanceCreationDate
    ds.ContentTime = ds.InstanceCreationTime
    ds.ReferencedRequestSequence = referenced_requests(sources)
    ds.PerformedProcedureCodeSequence = performed_procedure_codes(sources)
    ds.CurrentRequestedProcedureEvidenceSequence = hierarchical_references(sources)
    ds.ContributingEquipmentSequence = contributing_equipment(all_algorithms(result), equipment)
    root = encode(content_tree(result, sources), "4000")
    for element in root:
        ds.add(element)
    return ds

"""A study version's result objects, built from a PipelineResult and the source headers.

Pure: no database, no files. UIDs are stable for (result version, object kind), the version
being uids.version_key (study, inputs, weights, software, models, parameters), so building the
same version again gives the same UIDs and anything different gives new ones.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
from pydicom.dataset import Dataset

from mammonode.config import ResultsSection
from mammonode.exam.orientation import Frame
from mammonode.exam.views import VIEWS
from mammonode.pipeline.images import PreparedView
from mammonode.pipeline.run import PipelineResult
from mammonode.reporting.content import missing_views
from mammonode.reporting.header import PREDICT_EQUIPMENT, Equipment, hierarchical_references
from mammonode.reporting.images import result_images
from mammonode.reporting.repair import repaired
from mammonode.reporting.secondary_capture import SourceImage
from mammonode.reporting.tid1500 import build_sr
from mammonode.reporting.tid4000 import build_cad_sr
from mammonode.reporting.uids import stable_uid, version_key

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
SR_KINDS = ("sr", "sr-comprehensive")  # the TID 1500 report as Comprehensive 3D SR / Comprehensive SR


@dataclass
class BuiltObject:
    kind: str
    dataset: Dataset
    # True: send only when every model's weights are verified and none are test weights, unless a
    # setting allows otherwise (the Mammography CAD SR: a workstation must never show test CAD).
    clinical_only: bool = False


def sources_from_prepared(
    prepared: Mapping[str, PreparedView], headers: Mapping[str, Dataset]
) -> dict[str, SourceImage]:
    """The pipeline inputs as result sources: every view present (fewer than four for a
    partial result)."""
    out = {}
    for view in (v for v in VIEWS if v in prepared):
        p = prepared[view]
        grey = np.ascontiguousarray(p.orientation.convert(p.image, Frame.ACQUIRED, Frame.STORED))
        out[view] = SourceImage(view=view, dataset=headers[view], grey=grey, orientation=p.orientation)
    return out


def object_version(
    result: PipelineResult, study_uid: str, selection_key: str, settings: ResultsSection | None = None
) -> str:
    """The version key (uids.version_key) of the objects built with ``settings`` (less the
    delivery choices among them, which change no object)."""
    rendering = asdict(settings or ResultsSection())
    rendering.pop("cad_sr_with_test_weights", None)
    return version_key(study_uid, selection_key, result, rendering)


def build_objects(
    result: PipelineResult,
    sources: Mapping[str, SourceImage],
    study_uid: str,
    selection_key: str,
    benign_overlays: bool = False,
    predecessors: Mapping[str, Sequence[Dataset]] | None = None,
    comprehensive_sr: bool = False,
    settings: ResultsSection | None = None,
    equipment: Equipment = PREDICT_EQUIPMENT,
) -> list[BuiltObject]:
    """SCs (one malignant-heatmap overlay per view present, optionally benign), the summary, then
    the SR that references them all (and, with ``comprehensive_sr``, the same SR as Comprehensive
    SR). UIDs are stable for (version, kind). ``predecessors``: per SR kind, the superseded
    version's SR headers, listed in the new SR's Predecessor Documents Sequence.
    ``settings``: the ``[results]`` section (threshold, benign heatmaps, Parametric Maps,
    compression); its defaults when None. ``equipment``: this installation's Device Observer
    UID and serial number (header.Equipment; generated once per installation and kept)."""
    objects: list[BuiltObject] = []
    # Values devices send but DICOM forbids are repaired (or emptied) before any object copies
    # them: a malformed birth date or time never fails a job (reporting/repair.py).
    sources = {v: replace(s, dataset=repaired(s.dataset)) for v, s in sources.items()}
    headers = [sources[v].dataset for v in VIEWS if v in sources]
    settings = settings or ResultsSection()
    if benign_overlays:
        settings = replace(settings, benign_heatmaps=True)
    version = object_version(result, study_uid, selection_key, settings)
    images = result_images(
        result,
        sources,
        lambda k: stable_uid(study_uid, version, k),
        settings,
        device_serial_number=equipment.serial_number,
    )
    for kind, dataset in images:
        objects.append(BuiltObject(kind=kind, dataset=dataset))
    produced = [o.dataset for o in objects]
    sr = build_sr(
        result,
        headers,
        produced,
        stable_uid(study_uid, version, "series-sr"),
        stable_uid(study_uid, version, "sr"),
        equipment=equipment,
    )
    objects.append(BuiltObject(kind="sr", dataset=sr))
    if comprehensive_sr:
        variant = comprehensive_variant(
            sr,
            stable_uid(study_uid, version, "series-sr-comprehensive"),
            stable_uid(study_uid, version, "sr-comprehensive"),
        )
        objects.append(BuiltObject(kind="sr-comprehensive", dataset=variant))
    # The Mammography CAD SR (TID 4000): built for complete exams (delivery honours
    # clinical_only). Not for a partial result: TID 4000 holds exam-level findings, which
    # the view-wise models give and the image-wise ones do not (docs/conformance.md).
    if not missing_views(result):
        cad_sr = build_cad_sr(
            result,
            headers,
            stable_uid(study_uid, version, "series-cad-sr"),
            stable_uid(study_uid, version, "cad-sr"),
            equipment=equipment,
        )
        objects.append(BuiltObject(kind="cad_sr", dataset=cad_sr, clinical_only=True))
    for obj in objects:
        if predecessors and predecessors.get(obj.kind):
            set_predecessors(obj.dataset, predecessors[obj.kind])
    return objects


def comprehensive_variant(sr: Dataset, series_uid: str, sop_uid: str) -> Dataset:
    """The same report as Comprehensive SR, for archives that refuse Comprehensive 3D SR: the
    content is unchanged (it holds no 3D coordinates); the SOP instance is its own, since a
    SOP Instance UID is never reused with another SOP class."""
    if _has_value_type(sr, "SCOORD3D"):
        raise ValueError("the report holds 3D coordinates; it cannot be a Comprehensive SR")
    variant = copy.deepcopy(sr)
    variant.SOPClassUID = COMPREHENSIVE_SR
    variant.SOPInstanceUID = sop_uid
    variant.SeriesInstanceUID = series_uid
    if getattr(variant, "file_meta", None) is not None:
        variant.file_meta.MediaStorageSOPClassUID = COMPREHENSIVE_SR
        variant.file_meta.MediaStorageSOPInstanceUID = sop_uid
    return variant


def _has_value_type(item: Dataset, value_type: str) -> bool:
    return any(
        str(child.get("ValueType", "")) == value_type or _has_value_type(child, value_type)
        for child in item.get("ContentSequence", [])
    )


def set_predecessors(sr: Dataset, previous: Sequence[Dataset]) -> None:
    """Predecessor Documents Sequence (0040,A360): the SRs this one supersedes, as
    study / series / SOP references (Hierarchical SOP Instance Reference Macro)."""
    sr.PredecessorDocumentsSequence = hierarchical_references(previous)

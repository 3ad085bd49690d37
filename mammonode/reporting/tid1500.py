"""The Structured Report: a TID 1500 Measurement Report (highdicom Comprehensive 3D SR).

Tree (DICOM PS3.16 TID 1500; values in percent, as DICOM's CAD templates give 111047):
  Imaging Measurement Report
    language; observer = this installation (Device Observer UID, serial number); procedure
    Image Library: the source mammograms only, each with Image Laterality and Image View
    Imaging Measurements:
      per cancer model and breast   finding site Breast + laterality, its algorithm (TID 4019,
                                    once per group), P(cancer) 111047, P(benign) (local code)
      per breast, the ensemble      111047 with Derivation = Mean, its own algorithm
      per density model             finding site Breast + Bilateral, the four class
                                    probabilities (local codes); the model that gives the
                                    study's category also holds Breast composition (CID 6000)
      per image and image-wise model  finding site Breast + the image's laterality, Image View
                                    (CID 4014) as qualitative evaluation, P(cancer) 111047,
                                    P(benign), the image as source
    Qualitative Evaluations: comments - for a partial result (views missing) which views and
                             that the view-wise models did not run; the test/unverified notice,
                             that the scores are model outputs, which selected models did not run
Tracking UIDs derive from the SR's own (stable) SOP Instance UID, so a rebuild is identical.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from mammonode.exam.assignment import assign_view
from mammonode.exam.views import VIEWS, angle, laterality
from mammonode.pipeline.registry import IMAGEWISE_MODELS, spec
from mammonode.pipeline.run import PipelineResult
from mammonode.reporting import codes
from mammonode.reporting.content import (
    UNCALIBRATED,
    Algorithm,
    algorithm,
    all_algorithms,
    density_call,
    ensemble_algorithm,
    ensemble_members,
    malignancy_score,
    partial_lines,
    percent,
    skipped_lines,
    weights_notice,
)
from mammonode.reporting.header import (
    MANUFACTURER,
    MODEL_NAME,
    PREDICT_EQUIPMENT,
    Equipment,
    contributing_equipment,
    performed_procedure_codes,
    referenced_requests,
    set_equipment,
)
from mammonode.reporting.uids import stable_uid

SERIES_NUMBER = 9100
SERIES_DESCRIPTION = "AI results (mammonode)"
SIDES = (("right", "R"), ("left", "L"))
_CONTAINS = hd.sr.RelationshipTypeValues.CONTAINS
_ACQ = hd.sr.RelationshipTypeValues.HAS_ACQ_CONTEXT


def _algorithm_id(algo: Algorithm) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(name=algo.name, version=algo.version, parameters=list(algo.parameters) or None)


def _tracking(sop_uid: str, label: str, text: str) -> hd.sr.TrackingIdentifier:
    return hd.sr.TrackingIdentifier(uid=stable_uid(sop_uid, "tracking", label), identifier=text)


def _percent(name: Code, probability: float, derivation: Code | None = None) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=name, value=percent(probability), unit=codes.PERCENT, derivation=derivation)


def _site(side: str) -> list[hd.sr.FindingSite]:
    return [hd.sr.FindingSite(anatomic_location=codes.BREAST, laterality=codes.LATERALITY[side])]


def _sources(datasets: Sequence[Dataset]) -> list[hd.sr.SourceImageForMeasurementGroup]:
    return [hd.sr.SourceImageForMeasurementGroup.from_source_image(ds) for ds in datasets]


def _groups(result: PipelineResult, sources: Sequence[Dataset], sop_uid: str) -> list:
    by_side = {s: [ds for ds in sources if str(ds.get("ImageLaterality", "")) == s] for _, s in SIDES}
    groups = []
    for model in ensemble_members(result):
        preds, algo = result.cancer[model], _algorithm_id(algorithm(result, model))
        for side, letter in SIDES:
            groups.append(
                hd.sr.MeasurementsAndQualitativeEvaluations(
                    tracking_identifier=_tracking(
                        sop_uid, f"{model}-{side}", f"{side} breast, {spec(model).short_title} model"
                    ),
                    algorithm_id=algo,
                    finding_sites=_site(letter),
                    measurements=[
                        _percent(codes.PROBABILITY_OF_CANCER, preds[f"{side}_malignant"]),
                        _percent(codes.P_BENIGN, preds[f"{side}_benign"]),
                    ],
                    source_images=_sources(by_side[letter]) or None,
                )
            )
    ensemble = ensemble_algorithm(result)
    if ensemble is not None:
        algo = _algorithm_id(ensemble)
        for side, letter in SIDES:
            groups.append(
                hd.sr.MeasurementsAndQualitativeEvaluations(
                    tracking_identifier=_tracking(sop_uid, f"ensemble-{side}", f"{side} breast, ensemble"),
                    algorithm_id=algo,
                    finding_sites=_site(letter),
                    measurements=[_percent(codes.PROBABILITY_OF_CANCER, malignancy_score(result, side), codes.MEAN)],
                    source_images=_sources(by_side[letter]) or None,
                )
            )
    groups += _image_groups(result, sources, sop_uid)
    call = density_call(result)
    for name, data in result.density.items():
        model = f"density_{name}"
        chosen = call is not None and call.model == model
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=_tracking(sop_uid, model, f"breast density, {spec(model).short_title} model"),
                algorithm_id=_algorithm_id(algorithm(result, model)),
                finding_type=codes.BREAST_COMPOSITION,
                finding_sites=_site("B"),
                measurements=[_percent(codes.P_COMPOSITION[c], p) for c, p in zip("abcd", data["probabilities"])],
                qualitative_evaluations=[
                    hd.sr.QualitativeEvaluation(codes.BREAST_COMPOSITION, codes.COMPOSITION[data["category"]])
                ]
                if chosen
                else None,
                source_images=_sources(sources),
            )
        )
    return groups


def _image_groups(result: PipelineResult, sources: Sequence[Dataset], sop_uid: str) -> list:
    """One group per image and image-wise model: finding site Breast + the image's laterality,
    Image View (CID 4014) as a qualitative evaluation, P(cancer) = its malignant output, P(benign),
    and the image as the source of the measurements."""
    by_view = {assign_view(ds).view: ds for ds in sources}
    groups = []
    for model in (m for m in IMAGEWISE_MODELS if m in result.models):
        algo = _algorithm_id(algorithm(result, model))
        for view in (v for v in VIEWS if model in result.images.get(v, {})):
            preds = result.images[view][model]
            source = by_view.get(view)
            groups.append(
                hd.sr.MeasurementsAndQualitativeEvaluations(
                    tracking_identifier=_tracking(
                        sop_uid, f"{model}-{view}", f"{view} image, {spec(model).short_title}"
                    ),
                    algorithm_id=algo,
                    finding_sites=_site(laterality(view)),
                    measurements=[
                        _percent(codes.PROBABILITY_OF_CANCER, preds["malignant"]),
                        _percent(codes.P_BENIGN, preds["benign"]),
                    ],
                    qualitative_evaluations=[hd.sr.QualitativeEvaluation(codes.IMAGE_VIEW, codes.VIEW[angle(view)])],
                    source_images=_sources([source]) if source is not None else None,
                )
            )
    return groups


def _describe_library(report: hd.sr.MeasurementReport, sources: Sequence[Dataset]) -> None:
    """Add Image Laterality (CID 244) and Image View (CID 4014) after each entry's Modality;
    highdicom's TID 1602 entry has neither."""
    views = {str(ds.SOPInstanceUID): assign_view(ds).view for ds in sources}
    for library in report[0].ContentSequence:
        if library.ConceptNameCodeSequence[0].CodeValue != codes.IMAGE_LIBRARY.value:
            continue
        for group in library.ContentSequence:
            for image in group.ContentSequence:
                if image.ValueType != "IMAGE":
                    continue
                view = views[str(image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)]
                side, angle = view.split("-", 1)
                image.ContentSequence.insert(
                    1, hd.sr.CodeContentItem(codes.IMAGE_LATERALITY, codes.LATERALITY[side], relationship_type=_ACQ)
                )
                image.ContentSequence.insert(
                    2, hd.sr.CodeContentItem(codes.IMAGE_VIEW, codes.VIEW[angle], relationship_type=_ACQ)
                )


def _comments(result: PipelineResult) -> hd.sr.ContainerContentItem:
    """TID 1500 row 12: the notices belong in Qualitative Evaluations, not at the root."""
    texts = partial_lines(result) + [t for t in (weights_notice(result), UNCALIBRATED) if t] + skipped_lines(result)
    container = hd.sr.ContainerContentItem(name=codes.QUALITATIVE_EVALUATIONS, relationship_type=_CONTAINS)
    container.ContentSequence = [
        hd.sr.TextContentItem(name=codes.COMMENT, value=text, relationship_type=_CONTAINS) for text in texts
    ]
    return container


def build_sr(
    result: PipelineResult,
    sources: Sequence[Dataset],
    produced: Sequence[Dataset],
    series_uid: str,
    sop_uid: str,
    *,
    equipment: Equipment = PREDICT_EQUIPMENT,
) -> Dataset:
    """``sources``: the mammograms (headers; fewer than four for a partial result);
    ``produced``: the result images built with this SR (listed as evidence only, never in the
    Image Library: they are not sources); ``equipment``: this installation (Device Observer UID and serial number)."""
    observer = hd.sr.ObserverContext(
        observer_type=codes.DEVICE,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=equipment.device_uid,
            name=MODEL_NAME,
            manufacturer_name=MANUFACTURER,
            model_name=f"{MODEL_NAME} {result.software_version}",
            serial_number=equipment.serial_number,
            physical_location=equipment.physical_location,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.IMAGING_PROCEDURE,
        imaging_measurements=_groups(result, sources, sop_uid),
        referenced_images=list(sources),
    )
    _describe_library(report, sources)
    report[0].ContentSequence.append(_comments(result))
    sr = hd.sr.Comprehensive3DSR(
        evidence=list(sources) + list(produced),
        content=report[0],
        series_instance_uid=series_uid,
        series_number=SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        institution_name=equipment.institution_name,
        is_complete=True,
        is_final=False,
        is_verified=False,
        requested_procedures=referenced_requests(sources),
        specific_character_set="ISO_IR 192",  # UTF-8: the notice has an em dash
    )
    set_equipment(sr, result.software_version, equipment)
    sr.PerformedProcedureCodeSequence = performed_procedure_codes(sources)
    extra = contributing_equipment(all_algorithms(result, imagewise=True), equipment)
    sr.ContributingEquipmentSequence = list(sr.get("ContributingEquipmentSequence", [])) + extra
    sr.CodingSchemeIdentificationSequence = [codes.local_scheme()]
    notice = weights_notice(result)
    sr.SeriesDescription = SERIES_DESCRIPTION + (
        " - TEST WEIGHTS" if result.test_weights else (" - UNVERIFIED WEIGHTS" if notice else "")
    )
    return sr

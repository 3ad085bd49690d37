"""The Structured Report: a TID 1500 Measurement Report (highdicom Comprehensive 3D SR).

Tree:
  Imaging Measurement Report
    [Comment] TEST WEIGHTS — NOT FOR CLINICAL USE      (only with test/unverified weights)
    language, observer (device: mammonode), procedure reported
    Image Library: the four source mammograms and the secondary captures produced
    Imaging Measurements:
      one group per breast and cancer model   finding site Breast + laterality,
                                              P(cancer) (DCM 111047), P(benign finding),
                                              algorithm identification of that model
      one group per breast "malignancy score" the derived score (mean over cancer models)
      one group per density model             finding site both breasts, the four class
                                              probabilities; the group of the model that
                                              gives the category also holds the coded
                                              Breast composition (SCT 129715009)
Algorithm parameters (TID 4019) carry the weights' sha256, the test-weights flag, seed,
epochs, augmentation, device and processing time.
"""

from __future__ import annotations

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from mammonode import __version__
from mammonode.pipeline.registry import CANCER_MODELS, spec
from mammonode.pipeline.run import PipelineResult
from mammonode.reporting.content import density_call, malignancy_score
from mammonode.reporting.render import TEST_NOTICE
from mammonode.reporting.secondary_capture import MANUFACTURER, SERIES_NUMBERS

LOCAL = "99MAMMONODE"  # local coding scheme for concepts no standard code covers
PROBABILITY = hd.sr.CodedConcept("{probability}", "UCUM", "probability")
P_CANCER = codes.DCM.ProbabilityOfCancer  # (111047, DCM, "Probability of cancer")
P_BENIGN = hd.sr.CodedConcept("MN-001", LOCAL, "Probability of benign finding")
MALIGNANCY_SCORE = hd.sr.CodedConcept("MN-002", LOCAL, "Malignancy score")
P_CATEGORY = {
    c: hd.sr.CodedConcept(f"MN-01{i}", LOCAL, f"Probability of breast composition {c}") for i, c in enumerate("abcd")
}
BREAST_COMPOSITION = codes.SCT.BreastComposition  # (129715009, SCT, "Breast composition")
# BI-RADS composition categories, CID 6000 "Overall Breast Composition" (DICOM PS3.16):
# a 129716005 almost entirely fat, b 129717001 scattered fibroglandular densities,
# c 129718006 heterogeneously dense, d 129719003 extremely dense.
COMPOSITION = {
    "a": codes.cid6000.AlmostEntirelyFat,
    "b": codes.cid6000.ScatteredFibroglandularDensities,
    "c": codes.cid6000.HeterogeneouslyDense,
    "d": codes.cid6000.ExtremelyDense,
}
LATERALITY = {"left": codes.SCT.Left, "right": codes.SCT.Right}  # SCT 7771000 / 24028007
BOTH_BREASTS = codes.cid6022.BothBreasts
BREAST = codes.SCT.Breast  # SCT 76752008
DEVICE_UID = "2.25.144081342137547315542930768358315093441"  # this software as an SR observer device


def _algorithm(result: PipelineResult, model: str) -> hd.sr.AlgorithmIdentification:
    prov = result.models[model]
    params = result.parameters
    parameters = [
        f"weights_sha256={prov.sha256}",
        f"weights_verified={'true' if prov.verified else 'false'}",
        f"test_weights={'true' if prov.test_weights else 'false'}",
        f"seed={params.get('seed')}",
        f"epochs={params.get('epochs')}",
        f"augmentation={'true' if params.get('augmentation') else 'false'}",
        f"precision={params.get('precision')}",
        f"device={result.device}",
        f"processing_time_s={result.timing_s.get('total', 0.0):.1f}",
    ]
    return hd.sr.AlgorithmIdentification(
        name=f"mammonode {spec(model).title}"[:64], version=__version__, parameters=parameters
    )


def _source_images(sources: list[Dataset]) -> list[hd.sr.SourceImageForMeasurementGroup]:
    return [hd.sr.SourceImageForMeasurementGroup.from_source_image(ds) for ds in sources]


def _measurement(name, value: float, algorithm) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=name, value=float(value), unit=PROBABILITY, algorithm_id=algorithm)


def build_sr(
    result: PipelineResult, sources: list[Dataset], produced: list[Dataset], series_uid: str, sop_uid: str
) -> Dataset:
    """``sources``: the four mammograms (headers); ``produced``: the secondary captures."""
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=DEVICE_UID,
            name="mammonode",
            manufacturer_name=MANUFACTURER,
            model_name="mammonode",
        ),
    )
    groups = []
    by_side = {
        "left": [ds for ds in sources if str(ds.get("ImageLaterality", "")) == "L"],
        "right": [ds for ds in sources if str(ds.get("ImageLaterality", "")) == "R"],
    }
    for model in CANCER_MODELS:
        if model not in result.cancer:
            continue
        preds = result.cancer[model]
        algorithm = _algorithm(result, model)
        for side in ("right", "left"):
            groups.append(
                hd.sr.MeasurementsAndQualitativeEvaluations(
                    tracking_identifier=hd.sr.TrackingIdentifier(
                        uid=hd.UID(), identifier=f"{side} breast, {spec(model).short_title} model"
                    ),
                    algorithm_id=algorithm,
                    finding_sites=[hd.sr.FindingSite(anatomic_location=BREAST, laterality=LATERALITY[side])],
                    measurements=[
                        _measurement(P_CANCER, preds[f"{side}_malignant"], algorithm),
                        _measurement(P_BENIGN, preds[f"{side}_benign"], algorithm),
                    ],
                    source_images=_source_images(by_side[side]) or None,
                )
            )
    if result.cancer:
        for side in ("right", "left"):
            groups.append(
                hd.sr.MeasurementsAndQualitativeEvaluations(
                    tracking_identifier=hd.sr.TrackingIdentifier(
                        uid=hd.UID(), identifier=f"{side} breast, malignancy score"
                    ),
                    finding_sites=[hd.sr.FindingSite(anatomic_location=BREAST, laterality=LATERALITY[side])],
                    measurements=[
                        hd.sr.Measurement(
                            name=MALIGNANCY_SCORE,
                            value=float(malignancy_score(result, side)),
                            unit=PROBABILITY,
                            derivation=codes.SCT.Mean,  # CID 7464 derivation
                        )
                    ],
                )
            )
    call = density_call(result)
    for name, data in result.density.items():
        model = f"density_{name}"
        algorithm = _algorithm(result, model)
        qualitative = []
        if call is not None and call.model == model:
            qualitative = [hd.sr.QualitativeEvaluation(name=BREAST_COMPOSITION, value=COMPOSITION[call.category])]
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"breast density, {name} model"),
                algorithm_id=algorithm,
                finding_sites=[hd.sr.FindingSite(anatomic_location=BOTH_BREASTS)],
                measurements=[_measurement(P_CATEGORY[c], p, algorithm) for c, p in zip("abcd", data["probabilities"])],
                qualitative_evaluations=qualitative or None,
                source_images=_source_images(sources),
            )
        )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.cid100.ImagingProcedure,
        imaging_measurements=groups,
        referenced_images=list(sources) + list(produced),
    )
    if result.test_weights or result.unverified_weights:
        notice = hd.sr.TextContentItem(
            name=codes.DCM.Comment,
            value=TEST_NOTICE if result.test_weights else "UNVERIFIED WEIGHTS \u2014 NOT FOR CLINICAL USE",
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
        root = report[0]
        root.ContentSequence.insert(0, notice)
    sr = hd.sr.Comprehensive3DSR(
        evidence=list(sources) + list(produced),
        content=report[0],
        series_instance_uid=series_uid,
        series_number=SERIES_NUMBERS["sr"],
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
    )
    sr.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: the notice text has an em dash
    scheme = Dataset()
    scheme.CodingSchemeDesignator = LOCAL
    scheme.CodingSchemeName = "mammonode local concepts"
    scheme.CodingSchemeResponsibleOrganization = "mammonode project"
    sr.CodingSchemeIdentificationSequence = [scheme]
    sr.SoftwareVersions = __version__
    sr.SeriesDescription = "AI results (mammonode)"
    return sr

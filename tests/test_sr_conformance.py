"""The two SRs against DICOM and the peers: the TID 1500 Measurement Report and the TID 4000
Mammography CAD SR. Expected codes are spelled here from DICOM PS3.16 and RESULTS-NOTES.md,
never taken from mammonode's own code tables; validity comes from dciodvfy, dsrdump and
PixelMed's DicomSRValidator."""

from __future__ import annotations

import hashlib
import re
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from support.dicom import density_dicoms
from support.paths import REQUIRE, need_tool

from mammonode.exam.orientation import Orientation
from mammonode.exam.views import VIEWS
from mammonode.pipeline.crop import CropInfo
from mammonode.pipeline.run import PipelineResult, ViewResult
from mammonode.pipeline.weights import ModelProvenance
from mammonode.reporting.header import Equipment
from mammonode.reporting.tid1500 import build_sr
from mammonode.reporting.tid4000 import build_cad_sr

slow = pytest.mark.slow
_DCIODVFY = re.compile(r"(?:^|\s-\s)(Error|Warning) - (.*)")
PIXELMED = [
    "java",
    "-Djdk.xml.xpathExprOpLimit=0",
    "-Djdk.xml.xpathExprGrpLimit=0",
    "-Djdk.xml.xpathTotalOpLimit=0",
    "-cp",
    "/usr/share/java/pixelmed.jar",
    "com.pixelmed.validate.DicomSRValidator",
]
# The one PixelMed error the CAD SR is allowed (RESULTS-NOTES.md, "Verified prototype"): TID 4007
# included HAS PROPERTIES, as the Mammography CAD SR IOD requires (CODE may not CONTAIN CODE and
# DCMTK refuses it), where PixelMed's template table expects CONTAINS. Only the position varies.
TID_4007_CONFLICT = re.compile(
    re.escape('Error: Template 4007 BreastComposition/[Row 1] CODE (129715009,SCT,"Breast composition"): ')
    + r"1(\.\d+)+"
    + re.escape(
        ': /CONTAINER (111036,DCM,"Mammography CAD Report")'
        '/CODE (111017,DCM,"CAD Processing and Findings Summary")'
        '/CONTAINER (111034,DCM,"Individual Impression/Recommendation")'
        '/CODE (111059,DCM,"Single Image Finding")'
        '/CODE (129715009,SCT,"Breast composition")'
        ": Incorrect relationship - expected CONTAINS - found HAS PROPERTIES"
    )
)
CAD_SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.50"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
LATERALITY_CID_244 = {"L": ("7771000", "SCT"), "R": ("24028007", "SCT")}
BREAST_CID_6022 = {"L": ("80248007", "SCT"), "R": ("73056007", "SCT")}
VIEW_CID_4014 = {"CC": ("399162004", "SCT"), "MLO": ("399368009", "SCT")}
P_CANCER = ("111047", "DCM")
PERCENT = ("%", "UCUM")
ARTIFACT = {"sr": "tid1500-sr", "cad_sr": "tid4000-sr"}  # file stem -> artifacts/density-exam-<this>-*.txt


# --- walking a content tree (independently of mammonode's encoder) -------------------------


def _code(seq) -> tuple[str, str]:
    return (str(seq[0].CodeValue), str(seq[0].CodingSchemeDesignator))


def _name(item: Dataset) -> tuple[str, str] | None:
    return _code(item.ConceptNameCodeSequence) if "ConceptNameCodeSequence" in item else None


def _value(item: Dataset) -> tuple[str, str]:
    return _code(item.ConceptCodeSequence)


def _kids(item: Dataset, name: tuple[str, str] | None = None) -> list[Dataset]:
    return [c for c in item.get("ContentSequence", []) if name is None or _name(c) == name]


def _one(item: Dataset, name: tuple[str, str]) -> Dataset:
    found = _kids(item, name)
    assert len(found) == 1, f"expected one {name}, found {len(found)}"
    return found[0]


def _walk(item: Dataset):
    yield item
    for child in item.get("ContentSequence", []):
        yield from _walk(child)


def _at(root: Dataset, ids) -> Dataset:
    """The content item a Referenced Content Item Identifier names (1 = the root)."""
    ids = [int(ids)] if isinstance(ids, int) else [int(i) for i in ids]
    assert ids[0] == 1
    item = root
    for index in ids[1:]:
        item = item.ContentSequence[index - 1]
    return item


def _num(item: Dataset) -> tuple[float, tuple[str, str]]:
    measured = item.MeasuredValueSequence[0]
    return float(measured.NumericValue), _code(measured.MeasurementUnitsCodeSequence)


def _texts(item: Dataset, name: tuple[str, str]) -> list[str]:
    return [str(c.TextValue) for c in _kids(item, name)]


def _source_headers() -> dict[str, Dataset]:
    headers = {}
    for path in density_dicoms():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        headers[str(ds.SOPInstanceUID)] = ds
    return headers


def _view_of(ds: Dataset) -> str:
    return f"{ds.ImageLaterality}-{ds.ViewPosition}"


# --- a synthetic result: fast checks of the trees' rules ------------------------------------


def _synthetic(skipped: dict[str, str] | None = None) -> tuple[PipelineResult, list[Dataset]]:
    headers = list(_source_headers().values())
    by_view = {_view_of(ds): ds for ds in headers}
    views = {}
    for view in VIEWS:
        ds = by_view[view]
        # As acquired, left breasts face right (tissue at the left edge), right ones face left.
        left, right = (0, 1500) if view[0] == "L" else (int(ds.Columns) - 1500, int(ds.Columns))
        crop = CropInfo((100, 2500, left, right), ((0, 0), 0), (0, (0, 0)), 0)
        views[view] = ViewResult(
            source=str(ds.SOPInstanceUID), orientation=Orientation(view, False), crop=crop, best_center=(0, 0)
        )

    def prov(name: str, verified: bool = False) -> ModelProvenance:
        return ModelProvenance(f"{name}.p", hashlib.sha256(name.encode()).hexdigest(), verified, not verified)

    models = ("patch", "image_only", "image_heatmaps", "density_histogram", "density_cnn")
    result = PipelineResult(
        study_instance_uid=str(headers[0].StudyInstanceUID),
        views=views,
        cancer={
            m: {"left_benign": 0.2, "right_benign": 0.3, "left_malignant": 0.1234, "right_malignant": 0.5}
            for m in ("image_only", "image_heatmaps")
        },
        density={
            "histogram": {"probabilities": [0.1, 0.6, 0.2, 0.1], "category": "b"},
            "cnn": {"probabilities": [0.1, 0.1, 0.2, 0.6], "category": "d"},
        },
        models={m: prov(m, verified=m == "density_histogram") for m in models},
        parameters={"seed": 0, "epochs": 10, "augmentation": True, "precision": "fp32"},
    )
    for name in skipped or {}:
        result.models.pop(name, None)
        result.cancer.pop(name, None)
        result.density.pop(name.removeprefix("density_"), None)
    result.skipped = dict(skipped or {})
    return result, [by_view[v] for v in VIEWS]


def _build(result: PipelineResult, headers: list[Dataset], equipment: Equipment | None = None):
    extra = {"equipment": equipment} if equipment else {}
    sr = build_sr(result, headers, [], "2.25.1", "2.25.2", **extra)
    cad = build_cad_sr(result, headers, "2.25.3", "2.25.4", **extra)
    return sr, cad


def _cad_summary(cad: Dataset) -> tuple[str, str]:
    return _value(_one(cad, ("111017", "DCM")))


def test_tracking_uids_and_trees_are_deterministic():
    result, headers = _synthetic()
    first_sr, first_cad = _build(result, headers)
    again_sr, again_cad = _build(result, headers)
    tracking = [str(i.UID) for i in _walk(first_sr) if _name(i) == ("112040", "DCM")]
    assert len(tracking) == len(set(tracking)) == 2 * 2 + 2 + 2  # 2 models x 2 breasts, ensemble, density
    assert tracking == [str(i.UID) for i in _walk(again_sr) if _name(i) == ("112040", "DCM")]
    assert first_cad.ContentSequence == again_cad.ContentSequence
    other = build_sr(result, headers, [], "2.25.1", "2.25.99")
    assert not set(tracking) & {str(i.UID) for i in _walk(other) if _name(i) == ("112040", "DCM")}


def test_a_skipped_model_is_not_success():
    result, headers = _synthetic({"image_heatmaps": "weights not installed (image_heatmaps_model.p)"})
    sr, cad = _build(result, headers)
    assert _cad_summary(cad) == ("111244", "DCM")  # CID 6047: Not all algorithms succeeded; with findings
    detections = _one(cad, ("111064", "DCM"))
    assert _value(detections) == ("111223", "DCM")  # CID 6042: Partially Succeeded
    failed = _one(detections, ("111025", "DCM"))  # Failed Detections
    names = [t for item in _kids(failed) for t in _texts(item, ("111001", "DCM"))]
    assert names == ["mammonode NYU image+heatmaps model (view-split ResNet-22)"]
    comments = _texts(_one(sr, ("C0034375", "UMLS")), ("121106", "DCM"))
    assert any(c.startswith("Not run: NYU image+heatmaps model") for c in comments)


def test_nothing_ran_means_no_algorithm_succeeded():
    skipped = {m: "weights not installed" for m in ("image_only", "image_heatmaps", "density_histogram", "density_cnn")}
    result, headers = _synthetic(skipped)
    result.models.pop("patch")
    cad = build_cad_sr(result, headers, "2.25.3", "2.25.4")  # (highdicom's TID 1500 needs a measurement)
    assert _cad_summary(cad) == ("111245", "DCM")  # No algorithms succeeded; without findings
    assert _kids(_one(cad, ("111017", "DCM"))) == []
    assert _value(_one(cad, ("111064", "DCM"))) == ("111224", "DCM")  # Failed


def test_installation_identity_is_the_callers():
    one, two = Equipment.generate(), Equipment.generate("Test Screening Centre")
    assert one.device_uid != two.device_uid and one.serial_number != two.serial_number
    assert re.fullmatch(r"2\.25\.[1-9]\d*", one.device_uid) and len(one.device_uid) <= 64
    result, headers = _synthetic()
    sr, cad = _build(result, headers, two)
    observer = {_name(i): i for i in _kids(sr) if i.RelationshipType == "HAS OBS CONTEXT"}
    assert observer[("121012", "DCM")].UID == two.device_uid  # Device Observer UID
    assert observer[("121016", "DCM")].TextValue == two.serial_number  # Device Observer Serial Number
    for ds in (sr, cad):
        assert ds.DeviceSerialNumber == two.serial_number
        assert ds.InstitutionName == "Test Screening Centre"


def test_synthetic_srs_pass_dciodvfy_and_dsrdump(tmp_path):
    dciodvfy, dsrdump = need_tool("dciodvfy"), need_tool("dsrdump")
    result, headers = _synthetic({"density_cnn": "weights not installed"})
    for name, ds in zip(("sr", "cad_sr"), _build(result, headers)):
        path = tmp_path / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        errors, _ = _dciodvfy(dciodvfy, path)
        assert not errors, f"{name}: {errors}"
        run = subprocess.run([dsrdump, "-v", str(path)], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0 and not _dsrdump_errors(run.stderr), run.stderr


# --- the density exam, as `mammonode predict --results-out` wrote it --------------------------


def _dciodvfy(tool: str, path: Path) -> tuple[list[str], list[str]]:
    run = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)
    found = [m.groups() for line in (run.stdout + run.stderr).splitlines() if (m := _DCIODVFY.search(line))]
    return [t for level, t in found if level == "Error"], [t for level, t in found if level == "Warning"]


def _dsrdump_errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("E:")]


def _results(dicom_run) -> dict[str, Path]:
    return {p.stem: p for p in Path(dicom_run["_results_dir"]).glob("*.dcm")}


@pytest.fixture(scope="module")
def srs(dicom_run) -> dict[str, Dataset]:
    files = _results(dicom_run)
    assert {"sr", "cad_sr"} <= set(files)
    return {name: pydicom.dcmread(files[name]) for name in ("sr", "cad_sr")}


@pytest.fixture(scope="module")
def pixelmed(dicom_run, artifacts) -> dict[str, list[str]]:
    """DicomSRValidator's output per SR (it always exits 0: the lines are the verdict)."""
    need_tool("java")
    if not Path(PIXELMED[5]).exists():
        message = "pixelmed-apps not installed (scripts/test.sh installs it)"
        pytest.fail(message) if REQUIRE else pytest.skip(message)
    out = {}
    for name in ("sr", "cad_sr"):
        run = subprocess.run([*PIXELMED, str(_results(dicom_run)[name])], capture_output=True, text=True, timeout=900)
        text = run.stdout + run.stderr
        (artifacts / f"density-exam-{ARTIFACT[name]}-pixelmed.txt").write_text(text)
        out[name] = text.splitlines()
    return out


@slow
def test_every_result_object_has_no_dciodvfy_errors(dicom_run):
    tool = need_tool("dciodvfy")
    for name, path in sorted(_results(dicom_run).items()):
        errors, warnings = _dciodvfy(tool, path)
        print(f"{name}: {len(errors)} errors, {len(warnings)} warnings {sorted(set(warnings))}")
        assert not errors, f"{name}: {errors}"
        if name == "cad_sr":
            assert not warnings, warnings


@slow
def test_dsrdump_loads_both_srs(dicom_run, artifacts):
    tool = need_tool("dsrdump")
    for name in ("sr", "cad_sr"):
        run = subprocess.run(
            [tool, "-v", "-Ec", str(_results(dicom_run)[name])], capture_output=True, text=True, timeout=60
        )
        (artifacts / f"density-exam-{ARTIFACT[name]}-dsrdump.txt").write_text(run.stdout + run.stderr)
        assert run.returncode == 0, run.stderr
        assert not _dsrdump_errors(run.stderr), run.stderr
    assert "Mammography CAD SR Document" in (artifacts / "density-exam-tid4000-sr-dsrdump.txt").read_text()


@slow
def test_pixelmed_finds_no_error_in_the_tid1500_sr(pixelmed):
    lines = pixelmed["sr"]
    assert "Found Root Template TID_1500 (MeasurementReport)" in lines
    assert "IOD validation complete" in lines
    assert [line for line in lines if line.startswith("Error:")] == []


@slow
def test_pixelmed_finds_only_the_tid4007_conflict_in_the_cad_sr(pixelmed):
    lines = pixelmed["cad_sr"]
    assert "Found MammographyCADSR IOD" in lines
    assert "Found Root Template TID_4000 (MammographyCADDocumentRoot)" in lines
    assert "IOD validation complete" in lines
    errors = [line for line in lines if line.startswith("Error:")]
    unexpected = [line for line in errors if not TID_4007_CONFLICT.fullmatch(line)]
    assert unexpected == []
    assert len(errors) == 4  # one Breast composition finding per image


@slow
def test_tid1500_sr_follows_the_corrected_tree(dicom_run, srs, test_weights_dir):
    sr, sources = srs["sr"], _source_headers()
    assert sr.SOPClassUID == COMPREHENSIVE_3D_SR
    assert sr.SeriesDescription.endswith(" - TEST WEIGHTS")
    # Image Library: the four mammograms only, each with Image Laterality (CID 244) and View.
    library = _one(sr, ("111028", "DCM"))
    images = [i for i in _walk(library) if i.ValueType == "IMAGE"]
    assert {str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for i in images} == set(sources)
    for image in images:
        source = sources[str(image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)]
        assert _value(_one(image, ("111027", "DCM"))) == LATERALITY_CID_244[source.ImageLaterality]
        assert _value(_one(image, ("111031", "DCM"))) == _code(source.ViewCodeSequence)
    # The notices: in Qualitative Evaluations (TID 1500 row 12), not at the root.
    assert not [i for i in _kids(sr) if i.ValueType == "TEXT" and i.RelationshipType == "CONTAINS"]
    comments = _texts(_one(sr, ("C0034375", "UMLS")), ("121106", "DCM"))
    assert comments[0].startswith("TEST WEIGHTS")
    assert any("not calibrated" in c for c in comments)
    # Every probability of cancer in percent; the ensemble is 111047 + Derivation Mean.
    groups = _kids(_one(sr, ("126010", "DCM")), ("125007", "DCM"))
    values = [i for i in _walk(sr) if _name(i) == P_CANCER]
    # 2 view-wise models x 2 breasts, the ensemble per breast, and (dicom_run has every model)
    # 2 image-wise models x 4 images.
    assert len(values) == 2 * 2 + 2 + 2 * 4
    for item in values:
        value, unit = _num(item)
        assert unit == PERCENT and 0 <= value <= 100 and round(value, 2) == value
    means = [i for i in values if any(_value(m) == ("373098007", "SCT") for m in _kids(i, ("121401", "DCM")))]
    assert len(means) == 2
    cancer = dicom_run["cancer"]
    for item in means:
        group = next(g for g in groups if any(c is item for c in _kids(g)))
        side = {"24028007": "right", "7771000": "left"}[
            _value(_one(_one(group, ("363698007", "SCT")), ("272741003", "SCT")))[0]
        ]
        mean = sum(cancer[m][f"{side}_malignant"] for m in ("image_only", "image_heatmaps")) / 2
        assert _num(item)[0] == pytest.approx(100 * mean, abs=0.006)
        assert _texts(group, ("111001", "DCM")) == ["mammonode NYU ensemble"]
    assert not any(_name(i) and _name(i)[0] == "MN-002" for i in _walk(sr))
    # Algorithm identification once per group, versioned by the weights' sha256.
    digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in test_weights_dir.iterdir()}
    for group in groups:
        (name,) = _texts(group, ("111001", "DCM"))
        (version,) = _texts(group, ("111003", "DCM"))
        parameters = _texts(group, ("111002", "DCM"))
        assert not any(p.startswith(("device=", "processing_time")) for p in parameters)
        if name != "mammonode NYU ensemble":
            sha = next(p.split("=", 1)[1] for p in parameters if p.startswith("weights_sha256="))
            assert sha in digests.values() and version.endswith("+" + sha[:12])
    for item in _walk(sr):
        if item.get("ValueType") == "NUM":
            assert not _kids(item, ("111001", "DCM"))
    # Density groups: finding site Breast, laterality Bilateral.
    density = [g for g in groups if "density" in _texts(g, ("112039", "DCM"))[0]]
    assert len(density) == 2
    for group in density:
        site = _one(group, ("363698007", "SCT"))
        assert _value(site) == ("76752008", "SCT")
        assert _value(_one(site, ("272741003", "SCT"))) == ("51440002", "SCT")
    # Header: request copied from the sources, per-algorithm contributing equipment.
    first = next(iter(sources.values()))
    (request,) = sr.ReferencedRequestSequence
    assert request.AccessionNumber == first.AccessionNumber and request.StudyInstanceUID == first.StudyInstanceUID
    assert "ReferencedStudySequence" in request and "RequestedProcedureID" in request
    processing = [
        i
        for i in sr.ContributingEquipmentSequence
        if _code(i.PurposeOfReferenceCodeSequence) == ("109102", "DCM") and i.Manufacturer == "mammonode"
    ]
    assert {i.ManufacturerModelName for i in processing} >= {"mammonode NYU ensemble"}
    assert len(processing) == len(dicom_run["models"]) + 1
    local = [s for s in sr.CodingSchemeIdentificationSequence if s.CodingSchemeDesignator == "99MAMMONODE"]
    assert len(local) == 1 and local[0].CodingSchemeUID.startswith("2.25.") and local[0].CodingSchemeVersion


@slow
def test_cad_sr_reports_the_scores_and_density_by_reference_to_its_library(dicom_run, srs):
    cad, sources = srs["cad_sr"], _source_headers()
    assert cad.SOPClassUID == CAD_SR_STORAGE and cad.Modality == "SR"
    assert _code(cad.ConceptNameCodeSequence) == ("111036", "DCM")
    assert cad.ContentTemplateSequence[0].TemplateIdentifier == "4000"
    assert cad.SeriesDescription.endswith(" - TEST WEIGHTS")
    assert cad.CompletionFlag == "COMPLETE" and cad.VerificationFlag == "UNVERIFIED"
    # Image Library: TID 4020 entries of the four mammograms.
    library = _one(cad, ("111028", "DCM"))
    entries = {str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID): i for i in _kids(library)}
    assert set(entries) == set(sources)
    for uid, entry in entries.items():
        source = sources[uid]
        assert _value(_one(entry, ("111027", "DCM"))) == BREAST_CID_6022[source.ImageLaterality]
        assert _value(_one(entry, ("111031", "DCM"))) == VIEW_CID_4014[source.ViewPosition]
        assert _num(_one(entry, ("110910", "DCM"))) == (source.Rows, ("{pixels}", "UCUM"))
        assert _num(_one(entry, ("110911", "DCM"))) == (source.Columns, ("{pixels}", "UCUM"))
    # Every by-reference item points at an Image Library entry.
    references = [i for i in _walk(cad) if "ReferencedContentItemIdentifier" in i]
    assert references
    for ref in references:
        target = _at(cad, ref.ReferencedContentItemIdentifier)
        assert any(target is e for e in entries.values())
    # All models ran: all algorithms succeeded, with findings.
    summary = _one(cad, ("111017", "DCM"))
    assert _value(summary) == ("111242", "DCM")
    assert _value(_one(cad, ("111064", "DCM"))) == ("111222", "DCM")
    assert _value(_one(cad, ("111065", "DCM"))) == ("111222", "DCM")
    impressions = _kids(summary, ("111034", "DCM"))
    assert len(impressions) == 3  # right breast, left breast, density
    cancer = dicom_run["cancer"]
    for impression, side in zip(impressions[:2], ("right", "left")):
        (feature,) = _kids(impression, ("111015", "DCM"))
        assert _value(_one(feature, ("111056", "DCM"))) == ("111150", "DCM")  # Presentation Required
        value, unit = _num(_one(feature, P_CANCER))
        mean = sum(cancer[m][f"{side}_malignant"] for m in ("image_only", "image_heatmaps")) / 2
        assert unit == PERCENT and value == pytest.approx(100 * mean, abs=0.006)
        findings = _kids(feature, ("111059", "DCM"))
        assert len(findings) == 2
        for finding in findings:
            assert finding.RelationshipType == "INFERRED FROM"
            assert _value(finding) == ("111099", "DCM")  # Selected region
            assert _value(_one(finding, ("111056", "DCM"))) == ("111152", "DCM")  # Not for Presentation
            center = _one(finding, ("111010", "DCM"))
            assert center.GraphicType == "POINT"
            image = _at(cad, _kids(center)[0].ReferencedContentItemIdentifier)
            assert (
                sources[str(image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)].ImageLaterality == side[0].upper()
            )
    density = impressions[2]
    compositions = [_value(_one(f, ("129715009", "SCT"))) for f in _kids(density, ("111059", "DCM"))]
    # The histogram model (verified official weights) gives the category: b, CID 6000.
    assert compositions == [("129717001", "SCT")] * 4
    # No lesion marks: no Certainty of Finding, no CAD Operating Point, no lesion finding types.
    assert not [i for i in _walk(cad) if _name(i) in {("111012", "DCM"), ("111071", "DCM")}]
    assert {_value(i) for i in _walk(cad) if _name(i) == ("111059", "DCM")} == {
        ("111099", "DCM"),
        ("129715009", "SCT"),
    }


@slow
def test_cad_sr_regions_lie_on_the_breast_as_stored(dicom_run, srs):
    """Each per-view finding's outline (the analysed region) holds the breast in the stored
    image: the right views of the density exam face left, so a missed flip puts it off."""
    cad = srs["cad_sr"]
    pixels = {str(ds.SOPInstanceUID): ds.pixel_array for ds in map(pydicom.dcmread, density_dicoms())}
    outlines = [i for i in _walk(cad) if _name(i) == ("111041", "DCM")]
    assert len(outlines) == 4
    for outline in outlines:
        image = _at(cad, _kids(outline)[0].ReferencedContentItemIdentifier)
        stored = pixels[str(image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)]
        xs, ys = np.array(outline.GraphicData[0::2]), np.array(outline.GraphicData[1::2])
        tissue = stored > np.percentile(stored, 60)
        inside = np.zeros_like(tissue)
        inside[int(ys.min()) : int(ys.max()), int(xs.min()) : int(xs.max())] = True
        assert (tissue & inside).sum() / tissue.sum() > 0.9

"""Result objects for the density exam: valid DICOM (dciodvfy), a renderable SR (dsrdump), and a
summary image a radiologist can read."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from support.paths import need_tool

pytestmark = pytest.mark.slow
_FINDING = re.compile(r"(?:^|\s-\s)(Error|Warning) - (.*)")


def _results(dicom_run) -> dict[str, Path]:
    folder = Path(dicom_run["_results_dir"])
    return {p.stem: p for p in folder.glob("*.dcm")}


def test_every_sr_and_sc_passes_dciodvfy(dicom_run):
    tool = need_tool("dciodvfy")
    files = _results(dicom_run)
    assert {
        "sr",
        "summary",
        "sc-malignant-L-CC",
        "sc-malignant-R-CC",
        "sc-malignant-L-MLO",
        "sc-malignant-R-MLO",
    } <= set(files)
    for name, path in sorted(files.items()):
        run = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)
        findings = [m.groups() for line in (run.stdout + run.stderr).splitlines() if (m := _FINDING.search(line))]
        errors = [text for level, text in findings if level == "Error"]
        warnings = sorted({text for level, text in findings if level == "Warning"})
        print(f"{name}: {len(warnings)} distinct warnings: {warnings}")
        assert not errors, f"{name}: dciodvfy errors {errors}"


def test_dsrdump_renders_the_sr_with_the_required_content(dicom_run, reference, artifacts):
    tool = need_tool("dsrdump")
    sr = _results(dicom_run)["sr"]
    run = subprocess.run([tool, "-Ec", "-Ee", str(sr)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    text = run.stdout
    (artifacts / "density-exam-sr-dsrdump.txt").write_text(text)
    assert "TEST WEIGHTS" in text
    assert "Probability of cancer" in text
    assert '(129715009,SCT,"Breast composition")' in text or "Breast composition" in text
    # The category is the histogram model's (its weights are the verified official ones).
    assert "129717001" in text  # CID 6000: scattered fibroglandular densities (b)
    ds = pydicom.dcmread(sr)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR Storage
    assert ds.Manufacturer == "mammonode"
    first = ds.ContentSequence[0]
    assert first.TextValue.startswith("TEST WEIGHTS")
    source_uids = {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
        for p in Path(dicom_run["views"]["L-CC"]["source"]).parent.glob("*.dcm")
    }
    evidence = {
        str(i.ReferencedSOPInstanceUID)
        for s in ds.CurrentRequestedProcedureEvidenceSequence
        for se in s.ReferencedSeriesSequence
        for i in se.ReferencedSOPSequence
    }
    assert source_uids <= evidence
    assert ds.StudyInstanceUID == dicom_run["study_instance_uid"]


def test_heatmap_sc_keeps_source_geometry(dicom_run):
    files = _results(dicom_run)
    for view in ("L-CC", "R-CC", "L-MLO", "R-MLO"):
        sc = pydicom.dcmread(files[f"sc-malignant-{view}"])
        source = pydicom.dcmread(dicom_run["views"][view]["source"], stop_before_pixels=True)
        assert (sc.Rows, sc.Columns) == (source.Rows, source.Columns)
        assert sc.BurnedInAnnotation == "YES"
        assert list(sc.PixelSpacing) == list(source.PixelSpacing)
        assert list(sc.PatientOrientation) == list(source.PatientOrientation)
        assert sc.Laterality == view[0]
        assert sc.StudyInstanceUID == source.StudyInstanceUID
        assert sc.PatientID == source.PatientID


def test_summary_image_is_legible_and_not_blank(dicom_run, artifacts):
    ds = pydicom.dcmread(_results(dicom_run)["summary"])
    pixels = ds.pixel_array
    assert pixels.shape == (1080, 1920, 3)
    png = artifacts / "density-exam-summary.png"
    Image.fromarray(pixels).save(png)
    assert png.stat().st_size > 50_000
    assert pixels.std() > 20
    quadrants = [pixels[r : r + 540, c : c + 620].astype(np.float32) for r in (0, 540) for c in (0, 620)]
    for q in quadrants:
        assert q.std() > 10, "a view panel is blank"
    for i in range(4):
        for j in range(i + 1, 4):
            assert np.abs(quadrants[i] - quadrants[j]).mean() > 5, f"panels {i} and {j} look the same"
    table = pixels[:, 1250:].astype(np.float32)
    assert (table > 128).mean() > 0.005, "score table missing"

"""Header values real devices send but DICOM forbids never fail a job: the result objects
carry them repaired or emptied, as a PACS would, and dciodvfy finds no error in them.

Pure: result objects are built from a synthetic pipeline result and the sample exam's headers
(as tests/test_partial_results.py does), without running the pipeline."""

from __future__ import annotations

import copy
import warnings

import pydicom
import pytest
from pydicom.dataelem import DataElement
from support.dicom import density_dicoms
from test_partial_results import _dciodvfy_errors, _result
from test_state_machines import db, migrated  # noqa: F401 (fixtures)

from mammonode.config import ResultsSection
from mammonode.exam.orientation import Orientation
from mammonode.exam.views import VIEWS
from mammonode.reporting.objects import build_objects
from mammonode.reporting.repair import repaired
from mammonode.reporting.secondary_capture import SourceImage

LONG_FAMILY = "Vanderbilt-Featherstonehaugh-Montmorency-Cholmondeley-Auchinleck-Smythe"  # 71 chars
# (keyword, VR, what a device sent): each forbidden by PS3.5.
REAL_WORLD = [
    ("PatientBirthDate", "DA", "1961-07-04"),
    ("StudyTime", "TM", "10:12:33"),
    ("SeriesTime", "TM", "10:12:33"),
    ("ContentTime", "TM", "10:12:33.5"),
    ("StudyDate", "DA", "2024/01/02"),
    ("PatientSex", "CS", "f"),
    ("PatientAge", "AS", "fifty"),
    ("PatientName", "PN", f"{LONG_FAMILY}^Jane"),
    ("ReferringPhysicianName", "PN", f"{LONG_FAMILY}^Dr"),
    ("AccessionNumber", "SH", "ACC-2024-000000123456"),
]


@pytest.fixture(scope="module")
def exam() -> tuple[dict, dict]:
    headers, images = {}, {}
    for path in density_dicoms():
        ds = pydicom.dcmread(path)
        view = f"{ds.ImageLaterality}-{ds.ViewPosition}"
        images[view] = ds.pixel_array
        headers[view] = pydicom.dcmread(path, stop_before_pixels=True)
    return headers, images


def _as_sent(header: pydicom.Dataset) -> pydicom.Dataset:
    ds = copy.deepcopy(header)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for keyword, vr, value in REAL_WORLD:
            ds[pydicom.datadict.tag_for_keyword(keyword)] = DataElement(keyword, vr, value)
    return ds


def test_repair_rewrites_what_it_can_read_and_empties_the_rest(exam):
    sent = _as_sent(exam[0]["L-CC"])
    fixed = repaired(sent)
    assert fixed.PatientBirthDate == "19610704"
    assert fixed.StudyTime == "101233" and fixed.ContentTime == "101233.5"
    assert fixed.StudyDate == "20240102"
    assert fixed.PatientSex == "F"
    assert fixed.PatientAge in ("", None)  # an age in words: emptied, not guessed
    for keyword in ("PatientName", "ReferringPhysicianName"):
        assert all(len(group) <= 64 for group in str(fixed[keyword].value).split("="))
        assert str(fixed[keyword].value).endswith("^Jane" if keyword == "PatientName" else "^Dr")
    assert len(fixed.AccessionNumber) <= 16
    assert sent.PatientBirthDate == "1961-07-04"  # the source header is left as it was
    assert fixed.SOPInstanceUID == sent.SOPInstanceUID


def test_result_objects_from_real_world_headers_have_no_dciodvfy_errors(exam, tmp_path):
    headers, images = exam
    sent = {v: _as_sent(ds) for v, ds in headers.items()}
    result = _result(sent, VIEWS, exam_models=True)
    sources = {v: SourceImage(view=v, dataset=sent[v], grey=images[v], orientation=Orientation(v)) for v in VIEWS}
    objects = build_objects(
        result, sources, result.study_instance_uid, "key-real-world", settings=ResultsSection(sc_compression="rle")
    )
    kinds = {o.kind for o in objects}
    assert {"sr", "cad_sr", "summary"} <= kinds
    for obj in objects:
        path = tmp_path / f"{obj.kind}.dcm"
        obj.dataset.save_as(path, enforce_file_format=True)
        assert not _dciodvfy_errors(path), f"{obj.kind}: {_dciodvfy_errors(path)}"
        assert obj.dataset.get("PatientBirthDate") == "19610704"
        assert obj.dataset.get("PatientSex") == "F"


# --- no patient data in job errors ---------------------------------------------------------

BIRTH_DATE, NAME = "1961-07-04", "Doe^Jane"


def _worker_failing_with(monkeypatch, db, tmp_path, error: Exception):  # noqa: F811
    """A worker whose job reads a header holding a malformed birth date and a name, then fails
    with ``error`` (a pydicom-like message quoting them) while building the result."""
    from types import SimpleNamespace

    from mammonode.config import Config, StorageSection
    from mammonode.service import worker as worker_module

    header = pydicom.Dataset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        header.PatientBirthDate = BIRTH_DATE
    header.PatientName = NAME
    header.PatientID = "PID1"
    monkeypatch.setattr(worker_module, "read_dicom", lambda path, max_pixels=None: header)
    monkeypatch.setattr(worker_module, "prepare_dicom", lambda view, ds, sop, max_pixels=None: SimpleNamespace())
    monkeypatch.setattr(worker_module, "without_pixels", lambda ds: ds)

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(worker_module, "run_pipeline", fail)
    cfg = Config(storage=StorageSection(directory=str(tmp_path)))
    return worker_module.PipelineWorker(cfg, db, device="cpu", worker_id="w-phi")


@pytest.mark.parametrize(
    "error",
    [
        ValueError(f"Unable to convert '{BIRTH_DATE}' to 'DA' object"),
        ValueError(f"patient '{NAME}' (ID PID1, Test^Patient) of accession ACC1 does not match: Jane"),
    ],
    ids=["birth-date", "name"],
)
def test_job_errors_name_the_attribute_never_its_value(monkeypatch, db, tmp_path, caplog, error):  # noqa: F811
    from sqlalchemy import select
    from test_state_machines import queue_study, uid

    from mammonode.db import queries
    from mammonode.db.models import Event, Job

    study_id, job_id = queue_study(db, uid())
    worker = _worker_failing_with(monkeypatch, db, tmp_path, error)
    with caplog.at_level("INFO"):
        assert worker.run_once()
    with db.session() as s:
        job = s.get(Job, job_id)
        recorded = [job.last_error or ""]
        recorded += [e.message for e in s.execute(select(Event)).scalars()]
        overview = repr(queries.status(s, 1.0, 60.0, errors=50))
        detail = repr(queries.study_detail(s, job.study, 1.0))
    # The node's own log lines (pydicom's validation warnings pass logs.RedactPHI, checked below).
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("mammonode"))
    assert any("<PatientBirthDate>" in t or "<PatientName>" in t for t in recorded), recorded
    for where, text in {"job/events": "\n".join(recorded), "/status": overview, "study": detail, "log": logged}.items():
        for value in (BIRTH_DATE, NAME, "Jane", "Test^Patient", "PID1", "ACC1"):
            assert value not in text, f"{value!r} in the {where}: {text[:2000]}"


def test_pydicom_validation_warnings_reach_the_log_without_the_value():
    import logging

    from mammonode.logs import RedactPHI

    record = logging.LogRecord(
        "pydicom", logging.WARNING, __file__, 1, "Invalid value for VR DA: %r.", (BIRTH_DATE,), None
    )
    RedactPHI().filter(record)
    assert BIRTH_DATE not in record.getMessage() and "VR DA" in record.getMessage()

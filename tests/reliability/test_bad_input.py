"""Bad input: each gets a specific failure status or is stored and flagged; never a crash,
never a success for something not stored, never a blocked study."""

from __future__ import annotations

import copy
import re
import sqlite3
import time
from pathlib import Path

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import JPEG2000Lossless, generate_uid
from pynetdicom import AE
from pynetdicom.presentation import build_context

from mammonode.demo.phantom import exam_datasets
from mammonode.pipeline.weights_admin import generate_test_weights as generate

pytestmark = pytest.mark.network
MG = "1.2.840.10008.5.1.4.1.1.1.2"


UID_CHARS = re.compile(r"[0-9.]{1,64}")


def send_files(port: int, paths: list[Path]) -> list[int | None]:
    """Send files as they are (raw bytes, not decoded or re-encoded by the sender)."""
    from pynetdicom import _config

    _config.STORE_SEND_CHUNKED_DATASET = True
    contexts = set()
    for p in paths:
        try:
            meta = pydicom.filereader.read_file_meta_info(p)
            sop, ts = str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)
        except Exception:
            sop, ts = MG, "1.2.840.10008.1.2.1"
        # A mangled UID in the file meta cannot go into an association request (pynetdicom's
        # own encoder fails on it and the association times out): offer MG for it instead.
        explicit_le = "1.2.840.10008.1.2.1"
        contexts.add((sop if UID_CHARS.fullmatch(sop) else MG, ts if UID_CHARS.fullmatch(ts) else explicit_le))
    ae = AE(ae_title="BADSCU")
    ae.dimse_timeout = 60
    for sop, ts in contexts:
        ae.requested_contexts.append(build_context(sop, [ts]))
    assoc = ae.associate("127.0.0.1", port, ae_title="MAMMONODE")
    if not assoc.is_established:  # e.g. a mangled SOP class the node does not accept: a clean refusal
        return [None] * len(paths)
    out = []
    for p in paths:
        try:
            status = assoc.send_c_store(p)
            out.append(int(status.Status) if status is not None and "Status" in status else None)
        except Exception:
            out.append(None)
        if not assoc.is_established:
            assoc = ae.associate("127.0.0.1", port, ae_title="MAMMONODE")
    if assoc.is_established:
        assoc.release()
    return out


def stored_uids(node) -> set[str]:
    db = sqlite3.connect(node.storage / "mammonode.sqlite")
    try:
        return {row[0] for row in db.execute("select sop_instance_uid from instances")}
    finally:
        db.close()


def save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def deeply_nested(path: Path, depth: int) -> Path:
    """An SR-class data set whose Content Sequence nests ``depth`` levels (written byte by
    byte: pydicom's writer cannot produce such a file)."""
    import struct

    sr = Dataset()
    sr.file_meta = pydicom.dataset.FileMetaDataset()
    sr.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    sr.SOPClassUID = sr.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"
    sr.SOPInstanceUID = sr.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    sr.StudyInstanceUID, sr.SeriesInstanceUID, sr.Modality = generate_uid(), generate_uid(), "SR"
    sr.save_as(path, enforce_file_format=True)
    open_sq = struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF)
    open_item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    close_item = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    close_sq = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    with open(path, "ab") as fh:
        fh.write((open_sq + open_item) * depth + (close_item + close_sq) * depth)
    return path


def small_exam(**kw):
    return exam_datasets(shape=(400, 320), **kw)


def test_broken_data_sets_get_specific_failure_statuses(node_factory, tmp_path):
    node = node_factory(worker={"enabled": False}).start()
    base = small_exam()
    cases = {}
    good = save(base[0], tmp_path / "good.dcm")
    raw = good.read_bytes()
    (tmp_path / "truncated.dcm").write_bytes(raw[: len(raw) // 2])
    cases["truncated"] = tmp_path / "truncated.dcm"
    no_pixels = copy.deepcopy(base[1])
    del no_pixels.PixelData
    cases["no pixel data"] = save(no_pixels, tmp_path / "nopixels.dcm")
    short = copy.deepcopy(base[2])
    short.PixelData = short.PixelData[:1000]
    cases["pixel length mismatch"] = save(short, tmp_path / "short.dcm")
    huge = copy.deepcopy(base[3])
    huge.Rows, huge.Columns = 60000, 60000
    cases["huge rows/columns, small pixel data"] = save(huge, tmp_path / "huge.dcm")
    long_strings = small_exam()[0]
    long_strings.PatientName = "A" * 5000
    long_strings.StudyDescription = "B" * 100000
    long_strings.SOPInstanceUID = long_strings.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    cases["over-long strings (stored)"] = save(long_strings, tmp_path / "long.dcm")
    cases["deeply nested sequences"] = deeply_nested(tmp_path / "nested.dcm", depth=3000)
    paths = list(cases.values())
    statuses = dict(zip(cases, send_files(node.port, paths), strict=True))
    print(statuses)
    assert statuses["no pixel data"] == 0xA900
    assert statuses["pixel length mismatch"] == 0xA902
    assert statuses["huge rows/columns, small pixel data"] == 0xA902
    assert statuses["over-long strings (stored)"] == 0x0000
    assert statuses["truncated"] != 0x0000
    assert statuses["deeply nested sequences"] == 0xC000
    stored = stored_uids(node)
    assert str(long_strings.SOPInstanceUID) in stored
    for name in ("no pixel data", "pixel length mismatch", "huge rows/columns, small pixel data"):
        assert str(pydicom.dcmread(cases[name], force=True).SOPInstanceUID) not in stored, name
    assert send_files(node.port, [good]) == [0]
    assert node.proc.poll() is None


def test_study_content_problems_are_stored_and_flagged(node_factory, tmp_path):
    node = node_factory(worker={"enabled": False}, study={"quiet_period_s": 1.0, "incomplete_timeout_s": 8.0}).start()
    exam = small_exam()
    paths = [save(ds, tmp_path / f"v{i}.dcm") for i, ds in enumerate(exam)]
    # Extra and odd instances in the same study.
    spot = copy.deepcopy(exam[0])
    spot.SOPInstanceUID = spot.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    modifier = Dataset()
    modifier.CodeValue, modifier.CodingSchemeDesignator, modifier.CodeMeaning = "399163009", "SCT", "Spot compression"
    spot.ViewCodeSequence[0].ViewModifierCodeSequence = Sequence([modifier])
    contradictory = copy.deepcopy(exam[1])
    contradictory.SOPInstanceUID = contradictory.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    contradictory.ViewPosition = "MLO"
    no_laterality = copy.deepcopy(exam[2])
    no_laterality.SOPInstanceUID = no_laterality.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    del no_laterality.ImageLaterality
    processing = copy.deepcopy(exam[3])
    processing.SOPInstanceUID = processing.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    processing.SOPClassUID = processing.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2.1"
    processing.PresentationIntentType = "FOR PROCESSING"
    second_lcc = copy.deepcopy(exam[0])
    second_lcc.SOPInstanceUID = second_lcc.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    second_lcc.AcquisitionTime = "110000"
    ct = copy.deepcopy(exam[1])
    ct.SOPInstanceUID = ct.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ct.SOPClassUID = ct.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ct.Modality = "CT"
    sr = Dataset()
    sr.file_meta = pydicom.dataset.FileMetaDataset()
    sr.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    sr.SOPClassUID = sr.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"
    sr.SOPInstanceUID = sr.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    sr.StudyInstanceUID, sr.SeriesInstanceUID, sr.Modality = exam[0].StudyInstanceUID, generate_uid(), "SR"
    extras = {
        "spot": spot,
        "contradictory": contradictory,
        "no laterality": no_laterality,
        "for processing": processing,
        "second L-CC (newer)": second_lcc,
        "CT": ct,
        "SR": sr,
    }
    extra_paths = [save(ds, tmp_path / f"x{i}.dcm") for i, ds in enumerate(extras.values())]
    assert send_files(node.port, paths + extra_paths) == [0] * (len(paths) + len(extra_paths))
    uid = str(exam[0].StudyInstanceUID)
    detail = node.study(uid)
    by_uid = {i["sop_instance_uid"]: i for i in detail["instances"]}
    for name in ("spot", "contradictory", "no laterality", "CT", "SR"):
        inst = by_uid[str(extras[name].SOPInstanceUID)]
        assert inst["view"] == "other" and not inst["usable"] and inst["reason"], name
    assert not by_uid[str(processing.SOPInstanceUID)]["usable"]
    assert detail["views"]["L-CC"] == 2
    node.wait_for(lambda: node.study(uid)["state"] == "queued", 30, what="queued")
    # A two-view study next to it waits, then is incomplete; it never blocks the other study.
    two = small_exam()[:2]
    assert send_files(node.port, [save(ds, tmp_path / f"two{i}.dcm") for i, ds in enumerate(two)]) == [0, 0]
    two_uid = str(two[0].StudyInstanceUID)
    node.wait_for(lambda: node.study(two_uid)["state"] == "incomplete", 30, what="incomplete")
    assert node.study(uid)["state"] == "queued"


def test_undecodable_compressed_input_is_flagged_and_does_not_block(node_factory, tmp_path):
    weights = generate(tmp_path / "w", models=("density_histogram",))
    node = node_factory(
        weights_dir=weights,
        pipeline={"models": ["density_histogram"]},
        study={"quiet_period_s": 1.0, "incomplete_timeout_s": 10.0},
    ).start()
    broken_exam = exam_datasets(shape=(600, 480))
    broken = broken_exam[0]
    broken.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 64])  # a J2K marker, then nonsense
    broken.file_meta.TransferSyntaxUID = JPEG2000Lossless
    broken["PixelData"].VR = "OB"
    paths = [save(ds, tmp_path / f"b{i}.dcm") for i, ds in enumerate(broken_exam)]
    good_exam = exam_datasets(shape=(600, 480))
    good_paths = [save(ds, tmp_path / f"g{i}.dcm") for i, ds in enumerate(good_exam)]
    assert send_files(node.port, paths) == [0, 0, 0, 0]
    assert send_files(node.port, good_paths) == [0, 0, 0, 0]
    good_uid, broken_uid = str(good_exam[0].StudyInstanceUID), str(broken_exam[0].StudyInstanceUID)
    node.wait_for(lambda: node.study(good_uid)["state"] == "done", 120, what="good study done")

    def flagged():
        detail = node.study(broken_uid)
        inst = next(i for i in detail["instances"] if i["sop_instance_uid"] == str(broken.SOPInstanceUID))
        return detail if not inst["usable"] and "decode" in (inst["reason"] or "") else None

    node.wait_for(flagged, 120, what="undecodable instance flagged")
    node.wait_for(lambda: node.study(broken_uid)["state"] == "incomplete", 60, what="broken study incomplete")
    assert node.study(broken_uid)["missing_views"] == ["L-CC"]


@pytest.mark.slow
def test_fuzzed_data_sets_never_crash_or_get_false_success(node_factory, tmp_path):
    node = node_factory(worker={"enabled": False}).start()
    template = small_exam()[0]
    template.save_as(tmp_path / "template.dcm", enforce_file_format=True)
    raw = (tmp_path / "template.dcm").read_bytes()
    counter = {"n": 0}

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(
        st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(0, 255)), min_size=1, max_size=12),
        st.one_of(st.none(), st.integers(132, len(raw))),
        st.booleans(),
    )
    def fuzz(flips, cut, fresh_uid):
        data = bytearray(raw)
        if fresh_uid:
            counter["n"] += 1
            uid = f"1.2.826.0.1.3680043.10.999.{counter['n']}".encode()
            data = data.replace(
                str(template.SOPInstanceUID).encode(),
                uid.ljust(len(str(template.SOPInstanceUID)), b"\x00")[: len(str(template.SOPInstanceUID))],
            )
        for offset, value in flips:
            data[offset] = value
        if cut is not None:
            data = data[:cut]
        path = tmp_path / f"f{counter['n']}-{time.monotonic_ns()}.dcm"
        path.write_bytes(bytes(data))
        [status] = send_files(node.port, [path])
        assert node.proc.poll() is None, "the listener crashed"
        if status == 0:
            try:
                sop = str(pydicom.dcmread(path, stop_before_pixels=True, force=True).SOPInstanceUID).rstrip("\x00 ")
            except Exception:
                return
            assert sop in stored_uids(node), "success returned for an instance that was not stored"

    fuzz()
    assert send_files(node.port, [tmp_path / "template.dcm"]) == [0]

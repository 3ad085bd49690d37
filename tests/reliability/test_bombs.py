"""Decompression and image bombs against a running node: a deflated data set of gigabytes
from a few megabytes (C-STORE and STOW-RS), and a JPEG 2000 frame whose header declares a
gigapixel image. Each is refused with its own status or reason before any large allocation
(the node's peak RSS is read from /proc), nothing of it is stored, the study of the image
bomb is flagged, and the node goes on storing and processing other studies."""

from __future__ import annotations

import copy
import io
import sqlite3
import struct
import threading
import time
import uuid
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_fragmented_frames
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    generate_uid,
)
from pynetdicom import AE, _config
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification

from mammonode.demo.phantom import exam_datasets
from mammonode.ingest.layout import files_below
from mammonode.pipeline.weights_admin import generate_test_weights

pytestmark = pytest.mark.network
MG = "1.2.840.10008.5.1.4.1.1.1.2"
INFLATED = 5 << 29  # the bomb's data set: 2.5 GiB inflated, from about 2.5 MB sent
INFLATED_TOO_LARGE = 0xC002
MiB = 1 << 20


def deflate_bomb(path: Path, inflated: int) -> str:
    """A Deflated Explicit VR Little Endian MG file whose data set inflates to ``inflated``
    bytes (a header, then an OB element of zeros); written by streaming, never held whole.
    Zeros compressed once and ended by a full flush (byte-aligned, fresh state) can be
    repeated: the deflate stream is that block again and again, then a final block."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = MG, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientName, ds.PatientID = "MG", "BOMB^DEFLATE", "BOMB1"
    head = DicomBytesIO()
    head.is_little_endian, head.is_implicit_VR = True, False
    write_dataset(head, ds)
    zeros = inflated - len(head.getvalue()) - 12
    zeros -= zeros % 2
    element = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, zeros)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MG, ds.SOPInstanceUID
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian

    def deflated(data: bytes, mode: int) -> bytes:
        deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        return deflate.compress(data) + deflate.flush(mode)

    block = 32 * MiB
    repeated = deflated(bytes(block), zlib.Z_FULL_FLUSH)
    with open(path, "wb") as out:
        out.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(out, meta, enforce_standard=True)
        out.write(deflated(head.getvalue() + element, zlib.Z_FULL_FLUSH))
        count, rest = divmod(zeros, block)
        for _ in range(count):
            out.write(repeated)
        out.write(deflated(bytes(rest), zlib.Z_FINISH))
    return str(ds.SOPInstanceUID)


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in bytes."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values


def c_store(port: int, items: list[Path | Dataset]) -> list[tuple[int | None, str]]:
    """(Status, Error Comment) of each C-STORE over one association; files are sent as they
    are (their bytes, in their own transfer syntax), data sets in theirs."""
    _config.STORE_SEND_CHUNKED_DATASET = True
    ae = AE(ae_title="BOMBSCU")
    ae.dimse_timeout = ae.network_timeout = 120
    contexts = set()
    for item in items:
        meta = pydicom.filereader.read_file_meta_info(item) if isinstance(item, Path) else item.file_meta
        contexts.add((str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
    for sop_class, syntax in contexts:
        ae.requested_contexts.append(build_context(sop_class, [syntax]))
    assoc = ae.associate("127.0.0.1", port, ae_title="MAMMONODE")
    assert assoc.is_established
    out = []
    for item in items:
        status = assoc.send_c_store(item)
        out.append((int(status.Status) if "Status" in status else None, str(status.get("ErrorComment", ""))))
    assoc.release()
    return out


def c_echo(port: int) -> int:
    ae = AE(ae_title="BOMBSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="MAMMONODE")
    assert assoc.is_established
    status = assoc.send_c_echo()
    assoc.release()
    return int(status.Status)


def stow(node, parts: list[bytes]) -> requests.Response:
    boundary = uuid.uuid4().hex
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p + b"\r\n" for p in parts)
    return requests.post(
        f"http://127.0.0.1:{node.web_port}/dicomweb/studies",
        data=body + f"--{boundary}--\r\n".encode(),
        headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'},
        timeout=120,
    )


def recorded(node) -> dict[str, tuple[str, str]]:
    """SOP Instance UID -> (stored path, transfer syntax) of every recorded instance."""
    db = sqlite3.connect(node.storage / "mammonode.sqlite")
    try:
        rows = db.execute("select sop_instance_uid, path, transfer_syntax_uid from instances")
        return {uid: (path, syntax) for uid, path, syntax in rows}
    finally:
        db.close()


def deflated(ds: Dataset) -> Dataset:
    ds = copy.deepcopy(ds)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    return ds


def file_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_deflate_bomb_is_refused_by_c_store_and_stow_without_inflating_it_in_memory(node_factory, tmp_path):
    node = node_factory(worker={"enabled": False}).start()
    started = time.monotonic()
    bomb = tmp_path / "bomb.dcm"
    bomb_uid = deflate_bomb(bomb, INFLATED)
    sent = bomb.stat().st_size
    assert sent < 5 * MiB
    exam = exam_datasets(shape=(400, 320))
    # Deflated data sets of a sane size are stored, inflated, by either listener (and warm both up).
    assert c_store(node.port, [deflated(exam[0])]) == [(0, "")]
    assert stow(node, [file_bytes(deflated(exam[1]))]).status_code == 200
    before = memory(node.proc.pid)

    [(status, comment)] = c_store(node.port, [bomb])
    assert status == INFLATED_TOO_LARGE, hex(status or 0)
    assert "storage.max_inflated_bytes" in comment and str(1 << 30) in comment
    response = stow(node, [bomb.read_bytes()])
    assert response.status_code == 409, response.text
    [failed] = pydicom.Dataset.from_json(response.json()).FailedSOPSequence
    assert failed.FailureReason == INFLATED_TOO_LARGE and failed.ReferencedSOPInstanceUID == bomb_uid

    after = memory(node.proc.pid)
    grown = after["VmHWM"] - before["VmHWM"]
    print(
        f"sent {sent} bytes inflating to {INFLATED}; node VmRSS {before['VmRSS']} -> {after['VmRSS']}, "
        f"VmHWM {before['VmHWM']} -> {after['VmHWM']} (+{grown}); C-STORE 0x{status:04X} {comment!r}; "
        f"STOW-RS {response.status_code} FailureReason 0x{failed.FailureReason:04X}"
    )
    assert grown < 64 * MiB, grown  # vs 2.5 GiB inflated: chunks, not the data set
    assert after["VmRSS"] - before["VmRSS"] < 64 * MiB

    # Nothing of the bomb is stored or left behind; the sane ones are stored inflated.
    stored = recorded(node)
    assert bomb_uid not in stored
    assert [p for p in files_below(node.storage / "tmp") if p.stat().st_size > MiB] == []
    assert max(p.stat().st_size for p in files_below(node.storage / "instances")) < 2 * MiB
    for ds in exam[:2]:
        path, syntax = stored[str(ds.SOPInstanceUID)]
        assert syntax == ExplicitVRLittleEndian
        kept = pydicom.dcmread(node.storage / path)
        assert kept.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert np.array_equal(kept.pixel_array, ds.pixel_array) and kept.PatientName == ds.PatientName

    # The node keeps answering.
    assert c_echo(node.port) == 0
    assert c_store(node.port, [exam[2]]) == [(0, "")]
    assert node.proc.poll() is None
    assert time.monotonic() - started < 120


def j2k_bomb(ds: Dataset, columns: int, rows: int) -> Dataset:
    """``ds`` compressed as JPEG 2000 whose SIZ then declares ``columns`` x ``rows`` (Xsiz and
    Ysiz, 15444-1 A.5.1: bytes 8-15 of the codestream; the rest left as encoded)."""
    ds = copy.deepcopy(ds)
    ds.compress(JPEG2000Lossless)
    [fragments] = list(generate_fragmented_frames(ds.PixelData, number_of_frames=1))
    codestream = bytearray(b"".join(fragments))
    assert codestream[:4] == b"\xff\x4f\xff\x51"
    xosiz, yosiz = struct.unpack_from(">II", codestream, 16)
    struct.pack_into(">II", codestream, 8, xosiz + columns, yosiz + rows)
    ds.PixelData = encapsulate([bytes(codestream)])
    return ds


def test_image_bomb_is_refused_before_decoding_and_flags_its_study_while_another_completes(node_factory, tmp_path):
    weights = generate_test_weights(tmp_path / "w", models=("density_histogram",))
    node = node_factory(
        weights_dir=weights,
        pipeline={"models": ["density_histogram"]},
        study={"quiet_period_s": 1.0, "incomplete_timeout_s": 10.0},
    ).start()
    node.wait_for(lambda: "started (device" in node.log(), 60, what="worker started")  # torch loaded
    bomb_exam = exam_datasets(patient_name="SECRET^BOMBPATIENT", patient_id="BOMBID77", shape=(600, 480))
    bomb_exam[0] = j2k_bomb(bomb_exam[0], 60000, 60000)
    good_exam = exam_datasets(shape=(600, 480))
    before = memory(node.proc.pid)

    statuses: dict[str, list] = {}
    senders = [
        threading.Thread(target=lambda k=k, e=e: statuses.__setitem__(k, c_store(node.port, e)))
        for k, e in (("bomb", bomb_exam), ("good", good_exam))
    ]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(120)
    assert statuses == {"bomb": [(0, "")] * 4, "good": [(0, "")] * 4}  # both stored: the bomb is caught before decoding

    good_uid, bomb_uid = str(good_exam[0].StudyInstanceUID), str(bomb_exam[0].StudyInstanceUID)
    node.wait_for(lambda: node.study(good_uid)["state"] == "done", 180, what="good study done")

    def flagged():
        detail = node.study(bomb_uid)
        inst = next(i for i in detail["instances"] if i["sop_instance_uid"] == str(bomb_exam[0].SOPInstanceUID))
        return inst if not inst["usable"] and "declares 60000 x 60000" in (inst["reason"] or "") else None

    inst = node.wait_for(flagged, 180, what="image bomb flagged")
    node.wait_for(lambda: node.study(bomb_uid)["state"] == "incomplete", 60, what="bomb study incomplete")
    detail = node.study(bomb_uid)
    after = memory(node.proc.pid)
    print(
        f"bomb study {detail['state']}, missing {detail['missing_views']}; L-CC reason: {inst['reason']}; "
        f"node VmHWM {before['VmHWM']} -> {after['VmHWM']}, VmRSS {after['VmRSS']}"
    )
    assert "Rows x Columns is 600 x 480" in inst["reason"]
    assert detail["missing_views"] == ["L-CC"]
    text = str(detail) + node.log()
    assert "SECRET" not in text and "BOMBPATIENT" not in text and "BOMBID77" not in text
    # 60000 x 60000 decoded would be 7.2 GB at 16 bits; the node never came near.
    assert after["VmHWM"] - before["VmHWM"] < 1024 * MiB
    assert node.proc.poll() is None and c_echo(node.port) == 0

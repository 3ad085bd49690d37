"""Delivery outcomes a hostile or quirky destination gives: warning statuses that still mean
stored (delivered once, never re-sent), and a STOW-RS destination that redirects elsewhere
(no bearer token leaves for the other origin, nothing counted as delivered).

Loopback only: an in-process pynetdicom Storage SCP and two tiny HTTP servers."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from pynetdicom import AE, evt
from sqlalchemy import select
from test_state_machines import db, migrated, receive, uid  # noqa: F401 (fixtures)

from mammonode.config import Config, DeliverySection, Destination, StorageSection
from mammonode.db.models import Delivery, DeliveryState
from mammonode.db.outbox import NewResult, register_results
from mammonode.delivery import send
from mammonode.delivery.status import is_delivered
from mammonode.demo.loopback import free_port
from mammonode.service.sender import DeliverySender

pytestmark = pytest.mark.network

# Storage warnings (PS3.4 B.2.3) and the general DIMSE warnings (PS3.7 C): all mean stored.
WARNINGS = (0xB000, 0xB006, 0xB007, 0x0001, 0x0107, 0x0116)


def _result_file(folder: Path, study_uid: str) -> tuple[Path, str]:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.PatientName = "Test^Patient"
    ds.PatientID = "PID1"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, str(ds.SOPInstanceUID)


class WarningSCP:
    """A Storage SCP answering each SOP instance with its assigned status, counting receipts."""

    def __init__(self, statuses: dict[str, int]):
        self.statuses = statuses
        self.received: list[str] = []
        self.port = free_port()
        ae = AE(ae_title="WARNSCP")
        ae.add_supported_context(SecondaryCaptureImageStorage, [ExplicitVRLittleEndian])
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )

    def _store(self, event) -> int:
        sop = str(event.request.AffectedSOPInstanceUID)
        self.received.append(sop)
        return self.statuses.get(sop, 0xC000)

    def stop(self) -> None:
        self.server.shutdown()


def test_warning_statuses_count_as_delivered_once_and_are_never_resent(db, tmp_path):  # noqa: F811
    study_uid = uid()
    study_id = receive(db, study_uid)
    storage = tmp_path / "storage"
    files = [_result_file(storage / "results", study_uid) for _ in WARNINGS]
    scp = WarningSCP({sop: status for (_, sop), status in zip(files, WARNINGS)})
    try:
        cfg = Config(
            storage=StorageSection(directory=str(storage)),
            delivery=DeliverySection(backoff_initial_s=0.05, backoff_max_s=0.05, max_attempts=8),
            destinations=[Destination(name="pacs", ae_title="WARNSCP", host="127.0.0.1", port=scp.port)],
        )
        results = [
            NewResult("sc", SecondaryCaptureImageStorage, sop, str(path.relative_to(storage))) for path, sop in files
        ]
        with db.session() as s:
            register_results(s, study_id, None, "key", results, ["pacs"])
        sender = DeliverySender(cfg, db)
        assert sender.run_once()
        for _ in range(3):  # anything the sender took for a failure would be due again by now
            time.sleep(0.2)
            assert not sender.run_once()
        with db.session() as s:
            rows = list(s.execute(select(Delivery)).scalars())
            states = {r.state for r in rows}
            statuses = sorted(r.last_status for r in rows)
        assert states == {DeliveryState.DELIVERED}
        assert statuses == sorted(WARNINGS)
        assert sorted(scp.received) == sorted(sop for _, sop in files)  # each exactly once
    finally:
        scp.stop()


def test_transport_reports_each_warning_as_delivered(tmp_path):
    files = [_result_file(tmp_path, generate_uid()) for _ in WARNINGS]
    scp = WarningSCP({sop: status for (_, sop), status in zip(files, WARNINGS)})
    try:
        dest = Destination(name="pacs", ae_title="WARNSCP", host="127.0.0.1", port=scp.port)
        items = [(i, path, SecondaryCaptureImageStorage) for i, (path, _) in enumerate(files)]
        outcome = send(dest, items, "MAMMONODE")
    finally:
        scp.stop()
    assert {i: status for i, (status, _) in outcome.items()} == dict(enumerate(WARNINGS))
    assert all(is_delivered(status) for status, _ in outcome.values())


# --- STOW-RS redirects ------------------------------------------------------------------------


class _Recorder(BaseHTTPRequestHandler):
    """The other origin: records every request's headers and claims to have stored anything."""

    seen: list[dict] = []
    sop_uid = ""

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        type(self).seen.append({"method": self.command, "path": self.path, **dict(self.headers)})
        ok = Dataset()
        item = Dataset()
        item.ReferencedSOPClassUID = SecondaryCaptureImageStorage
        item.ReferencedSOPInstanceUID = type(self).sop_uid
        ok.ReferencedSOPSequence = [item]
        body = ok.to_json().encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer  # noqa: N815

    def log_message(self, *args) -> None:
        pass


def _redirector(target: str, code: int) -> type[BaseHTTPRequestHandler]:
    class Redirect(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            self.send_response(code)
            self.send_header("Location", target + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_POST = _answer  # noqa: N815

        def log_message(self, *args) -> None:
            pass

    return Redirect


def _serve(handler) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_stow_redirect_to_another_origin_gets_no_token_and_is_not_delivered(tmp_path, code):
    path, sop = _result_file(tmp_path, generate_uid())
    _Recorder.seen, _Recorder.sop_uid = [], sop
    other = _serve(_Recorder)
    # Another origin: a different host name for the same loopback address, and another port.
    first = _serve(_redirector(f"http://localhost:{other.server_port}", code))
    try:
        dest = Destination(name="stow", url=f"http://127.0.0.1:{first.server_port}/dicom-web", token="s3cret-token")
        outcome = send(dest, [(1, path, SecondaryCaptureImageStorage)], "MAMMONODE")
    finally:
        first.shutdown()
        other.shutdown()
    status, message = outcome[1]
    assert not is_delivered(status), (status, message)
    assert "redirect" in message.lower()
    leaked = [h for h in _Recorder.seen if any("s3cret-token" in str(v) for v in h.values())]
    assert not leaked
    assert pydicom.dcmread(path).SOPInstanceUID == sop  # the file is untouched, kept for a retry

"""A destination that accepts the association and never answers holds up only itself, and
delivery resumes at once after the node is killed mid-delivery.

Each destination has its own sender and every wait for a peer is bounded by
``delivery.timeout_s``: the healthy destination gets every object while the hung one's first
attempt is still waiting, the hung one is retried with backoff, and once it answers again
gets each object exactly once. After kill -9 during delivery, the rows the dead process left
``sending`` are released at start-up (not after the 10-minute claim timeout), and every
object arrives under the SOP Instance UID the database recorded.

Loopback only: in-process pynetdicom Storage SCPs (one of them hangs inside its C-STORE
handler) and a tiny HTTP server that never answers; ports chosen at runtime."""

from __future__ import annotations

import signal
import socket
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt
from support.dicom import send_datasets
from support.node import NodeProcess, write_config
from support.paths import REPO

from mammonode.config import ConfigError, Destination, load_config
from mammonode.delivery import send
from mammonode.demo.loopback import free_port
from mammonode.demo.phantom import exam_datasets
from mammonode.pipeline.weights_admin import generate_test_weights

pytestmark = pytest.mark.network

PIPELINE = {"models": ["density_histogram"], "augmentation": False}
SHAPE = (600, 480)


class StorageSCP:
    """An in-process Storage SCP for every storage SOP class. While ``hanging`` it takes each
    C-STORE and never answers it (the handler blocks until :meth:`fix`); otherwise it answers
    success and records the object, so ``stored`` holds what a sender saw acknowledged."""

    def __init__(self, aet: str, hanging: bool = False):
        self.aet = aet
        self.port = free_port()
        self.hanging = hanging
        self._released = threading.Event()
        self._lock = threading.Lock()
        self.hung: list[tuple[float, str]] = []  # (monotonic time, SOP Instance UID) never answered
        self.stored: list[str] = []  # SOP Instance UIDs answered with success
        self.stored_at: list[float] = []
        ae = AE(ae_title=aet)
        ae.supported_contexts = AllStoragePresentationContexts
        ae.maximum_associations = 64  # hung associations keep their threads until fix()
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )

    def _store(self, event) -> int:
        sop = str(event.request.AffectedSOPInstanceUID)
        if self.hanging:
            with self._lock:
                self.hung.append((time.monotonic(), sop))
            self._released.wait(300)
            return 0xA700  # the sender gave up on this association long ago
        assert str(event.dataset.SOPInstanceUID) == sop
        with self._lock:
            self.stored.append(sop)
            self.stored_at.append(time.monotonic())
        return 0x0000

    def fix(self) -> None:
        """Answer from now on; handlers still blocked return (to associations long gone)."""
        self.hanging = False
        self._released.set()

    def stop(self) -> None:
        self._released.set()
        self.server.shutdown()

    def destination(self, name: str) -> dict:
        return {"name": name, "ae_title": self.aet, "host": "127.0.0.1", "port": self.port}


def _rows(node: NodeProcess, destination: str) -> list[sqlite3.Row]:
    """The destination's outbox rows with their result's SOP Instance UID, read directly (the
    CLI takes seconds to start on a busy machine; these checks are about timing)."""
    db = sqlite3.connect(node.storage / "mammonode.sqlite", timeout=10)
    db.row_factory = sqlite3.Row
    try:
        return list(
            db.execute(
                "select d.state, d.attempts, d.claimed_by, d.claimed_at, d.next_attempt_at, d.last_error,"
                " r.sop_instance_uid from deliveries d join result_objects r on r.id = d.result_id"
                " where d.destination = ? order by d.id",
                (destination,),
            )
        )
    finally:
        db.close()


def _node(node_factory, tmp_path: Path, destinations: list[dict], delivery: dict) -> NodeProcess:
    """A node running only the fast density model, its Secondary Captures uncompressed."""
    weights = generate_test_weights(tmp_path / "weights", seed=0, models=("density_histogram",))
    node = node_factory(weights_dir=weights, pipeline=PIPELINE, destinations=destinations, delivery=delivery)
    with open(node.config, "a") as fh:
        fh.write('[results]\nsc_compression = "none"\n')
    return node


def _send_exam(node: NodeProcess) -> None:
    assert send_datasets(node.port, exam_datasets(shape=SHAPE)) == [0, 0, 0, 0]


def test_a_hung_destination_holds_up_only_itself_and_is_retried_until_it_answers(node_factory, tmp_path):
    timeout_s = 6.0
    hung, healthy = StorageSCP("HUNGSCP", hanging=True), StorageSCP("OKSCP")
    try:
        node = _node(
            node_factory,
            tmp_path,
            # The hung destination first: one sender for both would try it first and wait.
            [hung.destination("hung"), healthy.destination("healthy")],
            {"timeout_s": timeout_s, "max_attempts": 100, "backoff_initial_s": 2.0, "backoff_max_s": 3.0},
        ).start()
        _send_exam(node)

        def healthy_has_all():
            rows = _rows(node, "healthy")
            return rows if rows and set(healthy.stored) == {r["sop_instance_uid"] for r in rows} else None

        routed = {r["sop_instance_uid"] for r in node.wait_for(healthy_has_all, 120, 0.1, "the healthy destination")}
        hung_now = _rows(node, "hung")
        # Everything reached the healthy destination while the hung one's first attempt still waited.
        assert hung.hung, "the hung destination was being sent to at the same time"
        assert all(r["attempts"] == 0 for r in hung_now), [dict(r) for r in hung_now]
        started = min(hung.hung[0][0], *healthy.stored_at)
        healthy_s = max(healthy.stored_at) - started
        assert healthy_s < timeout_s, healthy_s
        print(f"\nhealthy destination had all {len(routed)} objects {healthy_s:.2f} s after delivery began")

        def hung_retried():
            # Every row failed at least twice and none went through; the rows retry in batches
            # of their own (backoff jitter), so some may be in flight again at any moment.
            rows = _rows(node, "hung")
            failed_twice = all(r["state"] in ("pending", "sending") and r["attempts"] >= 2 for r in rows)
            return rows if failed_twice and any(r["state"] == "pending" for r in rows) else None

        retried = node.wait_for(hung_retried, 8 * timeout_s, 0.05, "the hung destination retried with backoff")
        assert {r["sop_instance_uid"] for r in retried} == routed
        waiting = [r for r in retried if r["state"] == "pending"]
        assert all(r["next_attempt_at"] > r["claimed_at"] for r in waiting), "due again only after a backoff"
        assert any("no response within 6 s" in r["last_error"] for r in retried), [r["last_error"] for r in retried]
        assert healthy.stored == list(dict.fromkeys(healthy.stored)), "healthy: each object once"

        hung.fix()
        fixed_at = time.monotonic()
        node.wait_for(
            lambda: all(r["state"] == "delivered" for r in _rows(node, "hung")),
            3 * timeout_s,
            0.1,
            "the fixed destination",
        )
        print(f"once it answered, the hung destination had everything {time.monotonic() - fixed_at:.2f} s later")
        time.sleep(2 * 0.5)  # a few sender rounds: nothing is sent again
        assert Counter(hung.stored) == Counter(routed), "each object exactly once once it answers"
        assert Counter(healthy.stored) == Counter(routed)
        assert "round failed" not in node.log()
    finally:
        hung.stop()
        healthy.stop()


def test_kill_9_during_delivery_resumes_at_once_with_the_same_uids(node_factory, tmp_path):
    archive = StorageSCP("ARCHIVE", hanging=True)
    try:
        node = _node(node_factory, tmp_path, [archive.destination("archive")], {"timeout_s": 120.0}).start()
        _send_exam(node)

        def in_flight():
            rows = _rows(node, "archive")
            return rows if archive.hung and rows and all(r["state"] == "sending" for r in rows) else None

        claimed = node.wait_for(in_flight, 120, 0.1, "delivery in flight")
        recorded = {r["sop_instance_uid"] for r in claimed}
        pid = node.proc.pid
        assert all(r["claimed_by"].startswith(f"{socket.gethostname()[:64]}:{pid}:") for r in claimed)
        node.proc.send_signal(signal.SIGKILL)
        node.proc.wait(30)
        assert {r["state"] for r in _rows(node, "archive")} == {"sending"}, "the claims outlived the process"

        archive.fix()
        restarted = time.monotonic()
        node.start()
        node.wait_for(lambda: set(archive.stored) == recorded, 60, 0.1, "delivery after the restart")
        resumed_s = time.monotonic() - restarted
        print(f"\nafter kill -9, all {len(recorded)} objects delivered {resumed_s:.2f} s after the restart began")
        time.sleep(1.0)
        rows = _rows(node, "archive")
        assert {r["sop_instance_uid"] for r in rows} == recorded, "the same result objects, the same UIDs"
        assert {(r["state"], r["attempts"]) for r in rows} == {("delivered", 1)}, "the lost attempt is not counted"
        assert Counter(archive.stored) == Counter(recorded), "each object once, under its recorded UID"
        assert "released" in node.log()
    finally:
        archive.stop()


# Transports and settings ---------------------------------------------------------------------


def _result_files(folder: Path, n: int) -> list[tuple[int, Path, str]]:
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = SecondaryCaptureImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = generate_uid(), generate_uid(), "OT"
        path = folder / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        items.append((i, path, SecondaryCaptureImageStorage))
    return items


def test_dimse_send_to_a_silent_peer_fails_the_batch_within_the_timeout(tmp_path):
    scp = StorageSCP("SILENT", hanging=True)
    try:
        dest = Destination(name="silent", ae_title="SILENT", host="127.0.0.1", port=scp.port)
        began = time.monotonic()
        outcome = send(dest, _result_files(tmp_path, 3), "MAMMONODE", timeout_s=1.0)
        took = time.monotonic() - began
    finally:
        scp.stop()
    assert took < 10, took
    assert set(outcome) == {0, 1, 2} and all(status is None for status, _ in outcome.values())
    assert "no response within 1 s" in outcome[0][1]


def test_stow_send_to_a_silent_service_fails_the_batch_within_one_timeout(tmp_path):
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(listener.accept()[0]), daemon=True).start()
    try:
        dest = Destination(name="cloud", url=f"http://127.0.0.1:{listener.getsockname()[1]}/dicom-web")
        began = time.monotonic()
        outcome = send(dest, _result_files(tmp_path, 3), "MAMMONODE", timeout_s=1.0)
        took = time.monotonic() - began
    finally:
        for conn in accepted:
            conn.close()
        listener.close()
    assert took < 5, "one timeout for the batch, not one per object"
    assert all(status is None for status, _ in outcome.values())
    assert "no response within 1 s" in outcome[0][1]
    assert all("did not answer an earlier object" in outcome[i][1] for i in (1, 2))


@pytest.mark.parametrize("value", [0, -1.0])
def test_delivery_timeout_must_be_positive(tmp_path, value):
    config = write_config(tmp_path / "config.toml", {"storage": {"directory": str(tmp_path)}, "delivery": {}})
    with open(config, "a") as fh:
        fh.write(f"timeout_s = {value}\n")
    with pytest.raises(ConfigError, match=r"delivery\.timeout_s"):
        load_config(config, environ={})
    assert load_config(REPO / "config.toml", environ={}).delivery.timeout_s == 60.0  # documented default

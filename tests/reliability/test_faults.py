"""Faults: crashes of the listener and of a worker, a locked database, patient data in logs."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time

import pydicom
import pytest
from support.dicom import send_datasets
from support.paths import REPO, need_shared, need_tool, temp_files
from support.peers import StoreSCP

from mammonode.demo.loopback import free_port
from mammonode.demo.phantom import exam_datasets
from mammonode.pipeline.weights_admin import generate_test_weights as generate

pytestmark = pytest.mark.network


def _consistent(node) -> tuple[int, int]:
    """Every row has its file and every file its row; nothing left in tmp/."""
    db = sqlite3.connect(node.storage / "mammonode.sqlite")
    paths = {row[0] for row in db.execute("select path from instances")}
    db.close()
    files = {str(p.relative_to(node.storage)) for p in (node.storage / "instances").rglob("*") if p.is_file()}
    assert paths == files
    assert not temp_files(node.storage)
    return len(paths), len(files)


def test_kill_9_during_c_store_leaves_no_partial_file_or_orphan_row(node_factory, tmp_path):
    storescu = need_tool("storescu")
    density = sorted(need_shared("samples", "dicom", "density-exam").glob("*.dcm"))
    node = node_factory(worker={"enabled": False}).start()
    files = density * 6  # 24 transfers of 10 MB; the node dies in the middle
    sender = subprocess.Popen(
        [storescu, "-aet", "SENDER", "-aec", "MAMMONODE", "127.0.0.1", str(node.port), *map(str, files)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.5)
    node.proc.send_signal(signal.SIGKILL)
    node.proc.wait()
    sender.wait(60)
    node.start()  # start-up recovery runs here
    stored, _ = _consistent(node)
    assert stored <= 4
    retry = subprocess.run(
        [storescu, "-aet", "SENDER", "-aec", "MAMMONODE", "127.0.0.1", str(node.port), *map(str, density)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert retry.returncode == 0
    assert _consistent(node) == (4, 4)


def test_worker_killed_mid_job_is_recovered_and_results_go_out_once(node_factory, tmp_path, test_weights_dir):
    port = free_port()
    node = node_factory(
        weights_dir=test_weights_dir,
        pipeline={"models": ["image_only", "density_histogram"]},
        worker={"enabled": False, "stale_after_s": 4.0, "heartbeat_interval_s": 1.0},
        destinations=[{"name": "archive", "ae_title": "STORESCP", "host": "127.0.0.1", "port": port}],
    ).start()
    scp = StoreSCP(tmp_path / "scp", port).start()
    density = sorted(need_shared("samples", "dicom", "density-exam").glob("*.dcm"))
    assert send_datasets(node.port, [pydicom.dcmread(p) for p in density]) == [0, 0, 0, 0]
    uid = str(pydicom.dcmread(density[0], stop_before_pixels=True).StudyInstanceUID)

    def worker():
        return subprocess.Popen(
            [sys.executable, "-m", "mammonode.cli", "worker", "--config", str(node.config), "--device", "cpu"],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    first = worker()
    try:
        node.wait_for(lambda: node.study(uid)["state"] == "running", 60, what="running")
        time.sleep(3)
        first.kill()
        first.wait()
        second = worker()
        detail = node.wait_for(
            lambda: (
                (d := node.study(uid))["state"] == "done"
                and d["results"]
                and all(x["state"] == "delivered" for r in d["results"] for x in r["deliveries"])
                and d
            ),
            240,
            interval=1,
            what="re-queued job done and delivered",
        )
        job = detail["jobs"][-1]
        assert job["attempts"] == 2 and "stopped heartbeating" in (
            node.status()["errors"][-1]["message"] + str([e["message"] for e in node.status()["errors"]])
        )
        time.sleep(3)
        received = sorted(str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in scp.files())
        # Every object routed to the archive, once (the CAD SR is kept, not sent: test weights).
        routed = [r["sop_instance_uid"] for r in detail["results"] if r["deliveries"]]
        assert received == sorted(routed) and any(r["kind"] == "cad_sr" for r in detail["results"])
    finally:
        scp.stop()
        for proc in (first, locals().get("second")):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(30)


def test_locked_database_refuses_instead_of_acknowledging(node_factory):
    node = node_factory(worker={"enabled": False}).start()
    [ds] = exam_datasets(shape=(300, 200))[:1]
    lock = sqlite3.connect(node.storage / "mammonode.sqlite", timeout=1, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        [status] = send_datasets(node.port, [ds], timeout=60)
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert status == 0xA701
    assert not list((node.storage / "instances").rglob("*.dcm")), "file kept although not recorded"
    assert send_datasets(node.port, [ds]) == [0]
    assert _consistent(node) == (1, 1)


def test_no_patient_name_or_id_in_logs(node_factory, tmp_path):
    weights = generate(tmp_path / "w", models=("density_histogram",))
    port = free_port()
    node = node_factory(
        weights_dir=weights,
        pipeline={"models": ["density_histogram"]},
        destinations=[{"name": "a", "ae_title": "STORESCP", "host": "127.0.0.1", "port": port}],
    )
    node.start()
    scp = StoreSCP(tmp_path / "scp", port).start()
    try:
        datasets = exam_datasets(patient_name="ZZPHITEST^ROSALIND", patient_id="PHIID987654", shape=(600, 480))
        datasets[3].SOPInstanceUID = "1.2.3.bad"  # an error path too
        statuses = send_datasets(node.port, datasets)
        assert statuses[:3] == [0, 0, 0] and statuses[3] != 0
        datasets = exam_datasets(patient_name="ZZPHITEST^ROSALIND", patient_id="PHIID987654", shape=(600, 480))
        assert send_datasets(node.port, datasets) == [0, 0, 0, 0]
        uid = str(datasets[0].StudyInstanceUID)
        node.wait_for(lambda: node.study(uid)["state"] == "done", 120, what="done")
        node.wait_for(
            lambda: all(d["state"] == "delivered" for r in node.study(uid)["results"] for d in r["deliveries"]),
            60,
            what="delivered",
        )
    finally:
        scp.stop()
        node.stop()
    log = node.log()
    assert "study" in log and len(log) > 500
    for needle in ("ZZPHITEST", "ROSALIND", "PHIID987654"):
        assert needle not in log


class FlakyPacs:
    """A pynetdicom storage SCP whose answer the test switches: reject the association,
    answer C-STORE with a failure status, or store."""

    def __init__(self):
        from pynetdicom import AE, evt
        from pynetdicom.presentation import AllStoragePresentationContexts

        from mammonode.demo.loopback import free_port

        self.mode = "reject"
        self.stored: list[str] = []
        self.ae = AE(ae_title="FLAKY")
        for cx in AllStoragePresentationContexts:
            self.ae.add_supported_context(cx.abstract_syntax)
        self.port = free_port()
        self.server = self.ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )

    def _store(self, event):
        if self.mode == "fail":
            return 0xA700
        self.stored.append(str(event.dataset.SOPInstanceUID))
        return 0x0000

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        self._mode = value
        if hasattr(self, "ae"):
            self.ae.require_calling_aet = ["NOBODY"] if value == "reject" else []


def test_destination_rejecting_then_failing_then_accepting(node_factory, tmp_path):
    weights = generate(tmp_path / "w", models=("density_histogram",))
    pacs = FlakyPacs()
    pacs.mode = "reject"
    node = node_factory(
        weights_dir=weights,
        pipeline={"models": ["density_histogram"]},
        destinations=[{"name": "flaky", "ae_title": "FLAKY", "host": "127.0.0.1", "port": pacs.port}],
        delivery={"max_attempts": 100, "backoff_initial_s": 0.5, "backoff_max_s": 1.0},
    ).start()
    try:
        datasets = exam_datasets(shape=(600, 480))
        assert send_datasets(node.port, datasets) == [0, 0, 0, 0]
        uid = str(datasets[0].StudyInstanceUID)

        def rows():
            return [d for r in node.study(uid)["results"] for d in r["deliveries"]]

        node.wait_for(lambda: (r := rows()) and all(d["attempts"] >= 2 for d in r), 120, what="rejected, retried")
        assert all("rejected" in (d["last_error"] or "") and d["state"] in ("pending", "sending") for d in rows())
        pacs.mode = "fail"
        node.wait_for(lambda: all(d["last_status"] == 0xA700 for d in rows()), 60, what="failure status, retried")
        assert all(d["state"] in ("pending", "sending") for d in rows())
        pacs.mode = "store"
        node.wait_for(lambda: all(d["state"] == "delivered" for d in rows()), 60, what="delivered once accepted")
        time.sleep(3)
        sent = [r["sop_instance_uid"] for r in node.study(uid)["results"] if r["deliveries"]]  # not the CAD SR
        assert sorted(pacs.stored) == sorted(sent)
    finally:
        pacs.server.shutdown()

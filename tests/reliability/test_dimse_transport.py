"""DIMSE transport abuse: transfers cut short leave no spool file behind, and a PDU that
declares gigabytes is refused unread (issue 13)."""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import Verification
from support.dicom import send_datasets
from support.node import wait_for

from mammonode.demo.phantom import exam_datasets

pytestmark = pytest.mark.network
A_ABORT_BY_USER = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0, 0])


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def echo(port: int) -> int | None:
    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="MAMMONODE")
    if not assoc.is_established:
        return None
    status = assoc.send_c_echo()
    assoc.release()
    return int(status.Status) if status is not None and "Status" in status else None


def test_aborted_transfer_spools_under_storage_and_is_swept(node_factory, tmp_path, monkeypatch):
    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(system_tmp))  # the node's system temp dir, to watch it
    node = node_factory(worker={"enabled": False}, node={"network_timeout_s": 1.0, "spool_max_age_s": 3.0}).start()
    spool = node.storage / "tmp" / "spool"
    big, small = exam_datasets(shape=(1200, 1000))[:2]  # ~2.4 MB: about ten P-DATA PDUs of 256 KiB
    seen: dict[str, list[Path]] = {}

    def cut_after_three(event):
        """On the sender's side, after its third P-DATA PDU: note the node's spool files,
        then send an A-ABORT and drop the connection in the middle of the data set."""
        if not isinstance(event.pdu, P_DATA_TF) or "files" in seen:
            return
        seen["pdus"] = seen.get("pdus", []) + [None]
        if len(seen["pdus"]) < 3:
            return
        seen["files"] = wait_for(lambda: list(spool.glob("*")), 5.0)
        raw = event.assoc.dul.socket.socket
        raw.sendall(A_ABORT_BY_USER)
        raw.shutdown(socket.SHUT_RDWR)

    ae = AE(ae_title="CUTSCU")
    ae.add_requested_context(str(big.SOPClassUID), [ExplicitVRLittleEndian])
    assoc = ae.associate(
        "127.0.0.1", node.port, ae_title="MAMMONODE", evt_handlers=[(evt.EVT_PDU_SENT, cut_after_three)]
    )
    assert assoc.is_established
    assert assoc.acceptor.maximum_length == 262144  # the finite default we advertise
    status = assoc.send_c_store(big)
    assert status is None or "Status" not in status  # never answered: cut short
    assoc.abort()

    files = seen.get("files")
    assert files and len(files) == 1, f"no spool file under {spool} during the transfer: {seen}"
    spooled = files[0]
    assert not list(system_tmp.rglob("*")), "spooled into the system temp dir"
    aborted_at = time.monotonic()
    # Still there for a moment (the sweep, not the abort, removes it) ...
    time.sleep(0.5)
    assert spooled.exists(), "removed at once: not by the sweep"
    # ... and gone once untouched for spool_max_age_s (3 s), within a sweep interval.
    assert wait_for(lambda: not spooled.exists(), 15.0), f"{spooled} left behind"
    gone_after = time.monotonic() - aborted_at
    assert wait_for(lambda: "spool files of aborted DIMSE transfers" in node.log(), 5.0)
    assert not list(spool.glob("*"))
    # Storing goes on, over the same advertised maximum, with several full-size PDUs.
    assert send_datasets(node.port, [small, big]) == [0x0000, 0x0000]
    assert not list(spool.glob("*")) and not list(system_tmp.rglob("*"))
    print(f"spool file {spooled.name} ({spooled.parent}) removed {gone_after:.1f} s after the abort")


def test_pdu_declaring_gigabytes_is_aborted_unread(node_factory):
    node = node_factory(worker={"enabled": False}).start()
    assert echo(node.port) == 0x0000  # warm up: the first association's threads and imports
    before = rss_mb(node.proc.pid)

    ae = AE(ae_title="HUGEPDU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="MAMMONODE")
    assert assoc.is_established
    raw = assoc.dul.socket.socket
    raw.sendall(struct.pack(">BBL", 0x04, 0, 2 << 30))  # P-DATA-TF declaring 2 GiB
    started = time.monotonic()
    sent = 0
    chunk = b"\0" * 65536
    try:
        while sent < 64 << 20 and time.monotonic() - started < 20:  # what an unbounded reader would buffer
            raw.sendall(chunk)
            sent += len(chunk)
    except OSError:
        pass  # the node closed the connection: expected
    assert wait_for(lambda: assoc.is_aborted or not assoc.is_alive(), 5.0), "association still open"
    closed_after = time.monotonic() - started
    assert closed_after < 5.0
    after = rss_mb(node.proc.pid)
    assert after - before < 8, f"node RSS {before:.1f} -> {after:.1f} MB after {sent >> 20} MB sent"
    assert wait_for(lambda: "a PDU declares 2147483648 bytes" in node.log(), 5.0)
    assert echo(node.port) == 0x0000
    print(f"closed after {closed_after:.2f} s, {sent} bytes accepted by TCP, RSS {before:.1f} -> {after:.1f} MB")

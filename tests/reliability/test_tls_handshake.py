"""TLS clients that connect and never send their ClientHello: they must not block the DIMSE
accept loop or the HTTPS server, and the node closes them after its timeout (issue: DIMSE
connection abuse)."""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path

import pytest
import requests
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from support.node import wait_for
from support.pki import make_pki, tls_node_settings

pytestmark = pytest.mark.network
SILENT = 5
ACSE_TIMEOUT_S = 3.0


def threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads line")


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """True when the other side closes ``sock`` within ``timeout`` (EOF or reset)."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionError:
        return True
    except TimeoutError:
        return False


def tls_echo(port: int, pki: dict[str, Path]) -> tuple[bool, float]:
    """A mutual-TLS association with one C-ECHO: (succeeded, seconds it took)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca.crt"]))
    context.load_cert_chain(certfile=str(pki["client.crt"]), keyfile=str(pki["client.key"]))
    ae = AE(ae_title="TLSECHO")
    ae.add_requested_context(Verification)
    ae.connection_timeout = 15  # TCP connect plus TLS handshake; a blocked accept loop runs into it
    ae.acse_timeout = 15
    start = time.monotonic()
    assoc = ae.associate("127.0.0.1", port, ae_title="MAMMONODE", tls_args=(context, "localhost"))
    ok = False
    if assoc.is_established:
        status = assoc.send_c_echo()
        ok = status is not None and int(status.Status) == 0
        assoc.release()
    return ok, time.monotonic() - start


def test_silent_tls_clients_do_not_block_dimse_associations(node_factory, tmp_path):
    pki = make_pki(tmp_path / "pki")
    node = node_factory(
        worker={"enabled": False},
        node=tls_node_settings(pki, acse_timeout_s=ACSE_TIMEOUT_S),
    ).start()
    ok, seconds = tls_echo(node.port, pki)  # warm up (imports, first association's threads)
    assert ok
    time.sleep(ACSE_TIMEOUT_S + 1)  # the start-up port probe is gone
    baseline = threads(node.proc.pid)
    silent = [socket.create_connection(("127.0.0.1", node.port), timeout=5) for _ in range(SILENT)]
    try:
        time.sleep(0.3)  # the node has accepted them
        ok, seconds = tls_echo(node.port, pki)
        during = threads(node.proc.pid)
        print(f"TLS C-ECHO, {SILENT} silent TLS clients open: {seconds:.2f} s; threads {during} (at rest {baseline})")
        assert ok, f"TLS association failed while {SILENT} silent clients were connected ({seconds:.1f} s)"
        assert seconds < 3.0
        started = time.monotonic()
        assert all(closed_by_peer(s, ACSE_TIMEOUT_S + 3 - (time.monotonic() - started)) for s in silent)
    finally:
        for s in silent:
            s.close()
    assert wait_for(lambda: threads(node.proc.pid) <= baseline, 10), (threads(node.proc.pid), baseline)
    timed_out = [line for line in node.log().splitlines() if "TLS handshake with 127.0.0.1:" in line]
    assert sum("not completed within" in line for line in timed_out) == SILENT, timed_out
    assert node.proc.poll() is None


def test_silent_tls_clients_do_not_block_https(node_factory, tmp_path):
    pki = make_pki(tmp_path / "pki")
    token = "https-token-71aa"
    node = node_factory(
        worker={"enabled": False},
        dicomweb={"tls_cert": str(pki["server.crt"]), "tls_key": str(pki["server.key"]), "token": token},
    ).start()
    silent = [socket.create_connection(("127.0.0.1", node.web_port), timeout=5) for _ in range(SILENT)]
    try:
        time.sleep(0.3)
        start = time.monotonic()
        response = requests.get(
            f"https://127.0.0.1:{node.web_port}/status",
            headers={"Authorization": f"Bearer {token}"},
            verify=str(pki["ca.crt"]),
            timeout=10,
        )
        seconds = time.monotonic() - start
        print(f"HTTPS /status with {SILENT} silent TLS connections open: {seconds:.2f} s")
        assert response.status_code == 200 and seconds < 3.0
    finally:
        for s in silent:
            s.close()
    assert node.proc.poll() is None

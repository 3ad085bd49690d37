"""The HTTP surface under a hostile client (issue 13): auth on every endpoint, no token in the
URL, 405/CORS/path traversal, QIDO bounds, STOW-RS size/part/time bounds and spooling,
escaped echoes, and idle or slow clients. One node (a real `mammonode serve` on loopback
ports chosen at run time) serves the whole module, with small limits so the tests are quick.
"""

from __future__ import annotations

import io
import json
import os
import socket
import sqlite3
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import pydicom
import pytest
import requests
from support.node import NodeProcess
from support.paths import REPO

from mammonode.demo.phantom import exam_datasets

pytestmark = pytest.mark.network
TOKEN = "surface-token-8c2e"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LIMITS = {
    "token": TOKEN,
    "max_request_bytes": 3_000_000,
    "max_parts": 20,
    "body_timeout_s": 3.0,
    "head_timeout_s": 2.0,
    "keep_alive_timeout_s": 2.0,
    "max_connections": 48,
}


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    proc = NodeProcess(tmp_path_factory.mktemp("surface"), worker={"enabled": False}, dicomweb=LIMITS).start()
    yield proc
    proc.stop(timeout=20)


def url(node, path: str) -> str:
    return f"http://127.0.0.1:{node.web_port}{path}"


def dicom_bytes(ds) -> bytes:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def multipart(parts: list[bytes], content_type: str = "application/dicom") -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = b"".join(f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode() + data + b"\r\n" for data in parts)
    return body + f"--{boundary}--\r\n".encode(), f'multipart/related; type="application/dicom"; boundary={boundary}'


def spools(node) -> list[Path]:
    """STOW-RS spool folders in the storage directory's temporary area."""
    tmp = node.storage / "tmp"
    return sorted(tmp.glob("stow-*")) if tmp.exists() else []


def raw_exchange(node, head: bytes, body_chunks=(), chunk_pause: float = 0.0, wait: float = 8.0) -> bytes:
    """Send a request over a plain socket (no client-side path normalisation), the body from a
    thread that ignores the server closing early, and read what comes back within ``wait``."""
    sock = socket.create_connection(("127.0.0.1", node.web_port), timeout=wait)

    def send():
        try:
            sock.sendall(head)
            for chunk in body_chunks:
                sock.sendall(chunk)
                if chunk_pause:
                    time.sleep(chunk_pause)
        except OSError:
            pass

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    got = b""
    deadline = time.monotonic() + wait
    try:
        while time.monotonic() < deadline:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                break
            except OSError:
                break
            if not data:
                break
            got += data
            if b"\r\n\r\n" in got:
                head_end = got.index(b"\r\n\r\n") + 4
                length = [
                    int(line.split(b":", 1)[1])
                    for line in got[:head_end].split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ]
                if length and len(got) >= head_end + length[0]:
                    break
    finally:
        sock.close()
    return got


def status_of(response: bytes) -> int:
    assert response.startswith(b"HTTP/1.1 "), response[:200]
    return int(response.split(b" ", 2)[1])


@pytest.fixture(scope="module")
def stored(node):
    """One small exam stored by STOW-RS (the positive control for the bounds below)."""
    datasets = exam_datasets(shape=(200, 160), patient_id="SURF0001")
    body, ctype = multipart([dicom_bytes(ds) for ds in datasets])
    r = requests.post(url(node, "/dicomweb/studies"), data=body, headers={**AUTH, "Content-Type": ctype}, timeout=60)
    assert r.status_code == 200, r.text
    assert len(r.json()["00081199"]["Value"]) == len(datasets)
    return datasets


# 1. Authentication, methods, CORS, path traversal


def test_every_endpoint_needs_the_token_and_never_takes_it_from_the_url(node, stored):
    paths = ["/", "/status", "/metrics", "/status/studies/1.2.3", "/dicomweb/studies", "/no/such/path"]
    study = str(stored[0].StudyInstanceUID)
    paths += [f"/dicomweb/studies/{study}/metadata", f"/dicomweb/studies/{study}"]
    for path in paths:
        assert requests.get(url(node, path), timeout=10).status_code == 401, path
        wrong = {"Authorization": "Bearer " + "x" * len(TOKEN)}
        assert requests.get(url(node, path), headers=wrong, timeout=10).status_code == 401, path
        assert requests.get(url(node, path), headers={"Authorization": TOKEN}, timeout=10).status_code == 401, path
    for path in ("/", "/status", "/metrics", "/dicomweb/studies"):
        assert requests.get(url(node, path), headers=AUTH, timeout=10).status_code == 200, path
        # A token in the URL is refused even alongside a right header, and alone.
        for param in ("access_token", "token"):
            r = requests.get(url(node, f"{path}?{param}={TOKEN}"), headers=AUTH, timeout=10)
            assert r.status_code == 401 and "URL" in r.json()["error"], (path, param, r.status_code)
            assert requests.get(url(node, f"{path}?{param}={TOKEN}"), timeout=10).status_code == 401
    assert "hmac.compare_digest" in (REPO / "mammonode/web/auth.py").read_text()  # constant-time comparison


def test_unknown_methods_get_405_and_foreign_origins_no_cors_grant(node, stored):
    for path in ("/status", "/metrics", "/", "/dicomweb/studies", f"/dicomweb/studies/{stored[0].StudyInstanceUID}"):
        for method in ("PUT", "DELETE", "PATCH", "FROB"):
            r = requests.request(method, url(node, path), headers=AUTH, timeout=10)
            assert r.status_code == 405, (method, path, r.status_code)
    evil = {"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"}
    for method in ("OPTIONS", "GET"):
        for headers in (evil, {**evil, **AUTH}):
            r = requests.request(method, url(node, "/status"), headers=headers, timeout=10)
            assert not any(k.lower().startswith("access-control-") for k in r.headers), r.headers


@pytest.mark.parametrize(
    "target",
    [
        "/dicomweb/studies/../../../../../../etc/passwd",
        "/dicomweb/studies/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/dicomweb/studies/..%2f..%2f..%2f..%2fetc%2fpasswd",
        "/dicomweb/studies/..%2fmammonode.sqlite",
        "/dicomweb/studies/%2e%2e%2f%2e%2e%2fconfig.toml/series/x/instances/y",
        "/dicomweb/studies/..%5c..%5cmammonode.sqlite/metadata",
        "/dicomweb/studies/%252e%252e%252f%252e%252e%252fetc%252fpasswd",
        "/dicomweb/studies/x/series/..%2f..%2f..%2fmammonode.sqlite/instances/..%2f..",
    ],
)
def test_wado_never_serves_a_file_outside_the_store(node, stored, target):
    head = f"GET {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n"
    response = raw_exchange(node, head.encode())
    assert status_of(response) in (400, 404), response[:300]
    assert b"root:" not in response and b"SQLite format" not in response and b"[dicomweb]" not in response


# 2. QIDO bounds


def test_qido_bad_limit_and_offset_are_400_huge_ones_capped_wildcards_bounded(node, stored):
    def qido(query: str) -> requests.Response:
        return requests.get(url(node, f"/dicomweb/studies?{query}"), headers=AUTH, timeout=10)

    for query in ("limit=abc", "limit=-1", "offset=1e3", "offset=", "limit=0x10", "limit=%F0%9F%98%80"):
        r = qido(query)
        assert r.status_code == 400, (query, r.status_code, r.text)
    assert len(qido("limit=" + "9" * 5000).json()) == 1  # capped, not a 500
    assert qido("offset=" + "9" * 40).json() == []
    assert len(qido("limit=1&offset=0").json()) == 1
    # Wildcards are DICOM's (* and ?), everything else literal: "[0-9]" is no character class.
    assert len(qido("PatientID=SURF*1").json()) == 1
    assert len(qido("PatientID=S?RF0001").json()) == 1
    assert qido("PatientID=SURF000[0-9]").json() == []
    # Bounded: too many wildcards or an over-long value is refused; a nasty one answered fast.
    assert qido("PatientID=" + "*a" * 17).status_code == 400
    assert qido("PatientName=" + "A" * 5000).status_code == 400
    started = time.monotonic()
    assert qido("PatientID=" + "*S" * 8 + "*X").json() == []
    assert qido("StudyDescription=" + "*x" * 16 + "y" * 1000).json() == []
    assert time.monotonic() - started < 5


# 3. STOW-RS bounds and spooling


def test_stow_over_max_request_bytes_is_413_by_content_length_and_while_streaming(node, stored):
    limit = LIMITS["max_request_bytes"]
    _, ctype = multipart([b""])
    # Declared too large: refused before any body byte is sent.
    head = (
        f"POST /dicomweb/studies HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Type: {ctype}\r\nContent-Length: {limit * 10}\r\n\r\n"
    ).encode()
    started = time.monotonic()
    response = raw_exchange(node, head, wait=8)
    assert status_of(response) == 413 and b"limit" in response, response[:300]
    assert time.monotonic() - started < 5
    # Chunked, no length: cut off once more than the limit has arrived.
    boundary = ctype.rsplit("=", 1)[1]
    body = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + b"\0" * (limit + 500_000)
    head = (
        f"POST /dicomweb/studies HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Type: {ctype}\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    chunks = [
        f"{len(body[i : i + 65536]):x}\r\n".encode() + body[i : i + 65536] + b"\r\n" for i in range(0, len(body), 65536)
    ]
    response = raw_exchange(node, head, chunks, wait=10)
    assert status_of(response) == 413, response[:300]
    node.wait_for(lambda: not spools(node), 10, interval=0.2, what="STOW spool removed after 413")


def test_stow_parts_spool_in_storage_tmp_and_are_removed_when_the_client_aborts(node, stored):
    assert not spools(node)  # the stored exam's spool is gone
    body, ctype = multipart([b"\0" * 1_000_000])
    head = (
        f"POST /dicomweb/studies HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    sock = socket.create_connection(("127.0.0.1", node.web_port), timeout=10)
    try:
        sock.sendall(head + body[:300_000])
        found = node.wait_for(
            lambda: [p for d in spools(node) for p in d.iterdir()], 5, interval=0.1, what="spool in storage/tmp"
        )
        assert found[0].stat().st_size > 0
    finally:
        sock.close()  # the client goes away mid-body
    node.wait_for(lambda: not spools(node), 10, interval=0.2, what="STOW spool removed after the client left")


def test_stow_part_cap_refuses_tens_of_thousands_of_tiny_parts_fast(node, stored):
    before = requests.get(url(node, "/status"), headers=AUTH, timeout=10).json()
    body, ctype = multipart([b"x"] * 20_000)
    head = (
        f"POST /dicomweb/studies HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    started = time.monotonic()
    response = raw_exchange(node, head, [body[i : i + 65536] for i in range(0, len(body), 65536)], wait=10)
    assert time.monotonic() - started < 5
    assert status_of(response) == 413 and b"parts" in response, response[:300]
    # No study came of it (counted over all states: the fixture's study moves on meanwhile).
    after = requests.get(url(node, "/status"), headers=AUTH, timeout=5).json()["studies"]
    assert sum(after.values()) == sum(before["studies"].values()), (before["studies"], after)
    node.wait_for(lambda: not spools(node), 10, interval=0.2, what="STOW spool removed after the part cap")


def test_stow_body_timeout_cuts_off_a_client_that_streams_forever(node, stored):
    _, ctype = multipart([b""])
    boundary = ctype.rsplit("=", 1)[1]
    head = (
        f"POST /dicomweb/studies HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Type: {ctype}\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    first = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    chunks = [f"{len(first):x}\r\n".encode() + first + b"\r\n"] + [b"1\r\n\0\r\n"] * 60
    started = time.monotonic()
    response = raw_exchange(node, head, chunks, chunk_pause=0.25, wait=12)
    elapsed = time.monotonic() - started
    assert status_of(response) == 408, response[:300]
    assert LIMITS["body_timeout_s"] - 0.5 < elapsed < LIMITS["body_timeout_s"] + 4
    node.wait_for(lambda: not spools(node), 10, interval=0.2, what="STOW spool removed after the body timeout")


# 4. Echoed values


def test_stow_response_never_echoes_markup_from_a_part(node, stored):
    from pydicom import config as pydicom_config

    ds = exam_datasets(shape=(64, 64), patient_id="SURF0002")[0]
    evil = '1.2.3<Injected a="b"/>&amp;'
    mode = pydicom_config.settings.writing_validation_mode
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
    try:
        ds.SOPInstanceUID = evil
        ds.file_meta.MediaStorageSOPInstanceUID = evil
        part = dicom_bytes(ds)
    finally:
        pydicom_config.settings.writing_validation_mode = mode
    body, ctype = multipart([part])
    for accept in ("application/dicom+xml", "application/dicom+json"):
        r = requests.post(
            url(node, "/dicomweb/studies/1.2%3Cb%3E"),
            data=body,
            headers={**AUTH, "Content-Type": ctype, "Accept": accept},
            timeout=30,
        )
        assert r.status_code == 409, (accept, r.status_code, r.text[:300])
        assert "Injected" not in r.text and "<b>" not in r.text, r.text
        if accept.endswith("xml"):
            ET.fromstring(r.content)  # well-formed
        else:
            assert "00081198" in json.loads(r.text)  # the failure is reported, without the value


def test_status_page_escapes_what_it_shows(node, stored):
    markup = "<script>alert(1)</script>"
    with sqlite3.connect(node.storage / "mammonode.sqlite") as conn:
        conn.execute(
            "INSERT INTO events (at, level, kind, study_instance_uid, message) VALUES (?, 'ERROR', ?, ?, ?)",
            ("2099-01-01 00:00:00.000000", "k" + markup[:20], "1.2" + markup[:30], "bad value " + markup),
        )
    page = requests.get(url(node, "/"), headers=AUTH, timeout=10)
    assert page.status_code == 200 and "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
    assert "<script" not in page.text


# 5. Idle and slow clients


def _sockets(pid: int) -> int:
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            n += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return n


def test_idle_and_slowloris_clients_are_capped_and_timed_out_and_status_keeps_answering(node, stored):
    pid = node.proc.pid
    baseline = _sockets(pid)
    idle = [socket.create_connection(("127.0.0.1", node.web_port), timeout=10) for _ in range(200)]
    slow = [socket.create_connection(("127.0.0.1", node.web_port), timeout=10) for _ in range(5)]
    stop = threading.Event()

    def trickle():
        header = f"GET /status HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nX-Slow: ".encode()
        i = 0
        while not stop.is_set():
            for s in slow:
                try:
                    s.send(header[i : i + 1] if i < len(header) else b"a")
                except OSError:
                    pass
            i += 1
            time.sleep(0.2)

    trickler = threading.Thread(target=trickle, daemon=True)
    trickler.start()
    try:
        time.sleep(0.5)
        started = time.monotonic()
        r = requests.get(url(node, "/status"), headers=AUTH, timeout=5)
        assert r.status_code == 200 and time.monotonic() - started < 5
        held = _sockets(pid) - baseline
        assert held <= LIMITS["max_connections"] + 2, f"{held} client sockets held for 205 idle clients"
        # Silent and trickling connections alike are closed after the request-head timeout.
        time.sleep(LIMITS["head_timeout_s"] + 1.5)
        for s in idle + slow:
            s.settimeout(2)
            try:
                assert s.recv(1024) == b"", "server answered an incomplete request"
            except ConnectionResetError:
                pass
        assert requests.get(url(node, "/status"), headers=AUTH, timeout=5).status_code == 200
    finally:
        stop.set()
        trickler.join(5)
        for s in idle + slow:
            s.close()


def test_metrics_labels_never_take_a_peer_chosen_sop_class(node, stored):
    """Each label value is a time series kept for the life of the process: a peer sending
    parts under invented SOP classes must not grow /metrics (they count as "other")."""
    from pydicom.uid import generate_uid

    invented = [f"1.2.826.0.1.3680043.10.999.{n}" for n in range(12)]
    template = exam_datasets(shape=(32, 32), patient_id="SURF1000")[0]
    parts = []
    for sop_class in invented:
        template.SOPClassUID = template.file_meta.MediaStorageSOPClassUID = sop_class
        template.SOPInstanceUID = template.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        parts.append(dicom_bytes(template))
    body, ctype = multipart(parts)
    r = requests.post(url(node, "/dicomweb/studies"), data=body, headers={**AUTH, "Content-Type": ctype}, timeout=60)
    assert r.status_code in (200, 202, 409), r.text[:300]
    metrics = requests.get(url(node, "/metrics"), headers=AUTH, timeout=10).text
    assert not any(uid in metrics for uid in invented)
    other = [
        line
        for line in metrics.splitlines()
        if line.startswith("mammonode_instances_received_total{") and 'sop_class="other"' in line
    ]
    assert sum(float(line.rsplit(" ", 1)[1]) for line in other) >= len(invented), other


def test_the_header_cache_is_bounded_in_bytes(tmp_path):
    """A header's cost is what parsing it read; one over the entry limit is never kept."""
    from mammonode.web.catalog import HeaderCache

    cache = HeaderCache(max_bytes=300_000, max_entry_bytes=150_000)
    paths = []
    for n, private_bytes in enumerate([100_000] * 5 + [200_000]):
        ds = exam_datasets(shape=(32, 32), patient_id=f"CACHE{n}")[0]
        ds.add_new(0x00091010, "LO", "MAMMONODE TEST")  # private creator
        ds.add_new(0x00091001 | 0x1000, "OB", b"\0" * private_bytes)
        path = tmp_path / f"{n}.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    for path in paths:
        assert cache.get(path).PatientID.startswith("CACHE")
        assert cache.bytes <= 300_000
    assert len(cache) == 2  # two 100 kB headers fit, the third evicts the oldest, 200 kB is not kept
    assert cache.get(paths[-1]).PatientID == "CACHE5" and len(cache) == 2

"""Peer-chosen control characters never reach a log line raw (issue 13): a CR/LF would
forge a log line, an ANSI escape would repaint the terminal of whoever tails the log."""

from __future__ import annotations

import socket
import time

import pytest
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification

pytestmark = pytest.mark.network
HOSTILE_AET = b"EV\r\nFORGED\x1b[31m"  # 16 bytes: CR LF, then an ANSI colour escape


def associate_rq(calling: bytes) -> bytes:
    """An A-ASSOCIATE-RQ (PS3.8 9.3.2) whose Calling AE Title field (bytes 26-41) holds
    ``calling`` as is: pynetdicom's own encoder refuses such a title, a hostile peer does not."""
    request = A_ASSOCIATE()
    request.application_context_name = "1.2.840.10008.3.1.1.1"
    request.calling_ae_title = "PLACEHOLDER"
    request.called_ae_title = "MAMMONODE"
    context = build_context(Verification)
    context.context_id = 1
    request.presentation_context_definition_list = [context]
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16384
    request.user_information = [max_length]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(request)
    data = bytearray(pdu.encode())
    data[26:42] = calling.ljust(16, b" ")
    return bytes(data)


def test_control_characters_from_a_peer_are_escaped_in_the_text_log(node_factory):
    node = node_factory(worker={"enabled": False})
    node.config.write_text(node.config.read_text().replace("json = true", "json = false"))
    assert "json = false" in node.config.read_text()
    node.start()
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as peer:
        peer.sendall(associate_rq(HOSTILE_AET))
        answer = peer.recv(1)
    deadline = time.monotonic() + 10
    while "FORGED" not in node.log() and time.monotonic() < deadline:
        time.sleep(0.2)
    node.stop()
    log = node.log()
    assert answer in (b"\x02", b"\x03", b"\x07", b""), answer  # an accept, reject or abort: never a hang
    assert "FORGED" in log, log[-2000:]
    assert "\x1b" not in log and "\r" not in log
    assert "EV\\x0d\\x0aFORGED\\x1b[31m" in log
    for line in log.splitlines():
        # Every line is a record's first line (timestamp first) or a traceback's, never text
        # a peer started with its own line break.
        assert not line.startswith("FORGED"), line
    print(f"peer answered {answer!r}; the AE title appears escaped in {log.count('FORGED')} log lines")

"""Audit messages as RFC 5424 syslog messages to an audit record repository: over TLS with
octet-counting framing (RFC 5425, DICOM PS3.15 A.6) or one message per UDP datagram
(RFC 5426, A.7).

PRI is facility 10 (security/authorization) with severity 5 (notice), 4 (warning) for a
failure outcome, so "<85>" for most. MSGID is "DICOM+RFC3881", the value PS3.15 names for
messages in its format. MSG is the XML, UTF-8 with the BOM RFC 5424 asks for.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import ssl
from dataclasses import dataclass

FACILITY = 10
MSGID = "DICOM+RFC3881"
BOM = b"\xef\xbb\xbf"
UDP_MAX = 65507  # the largest UDP payload over IPv4

log = logging.getLogger(__name__)


class SendError(OSError):
    """The repository could not be reached or took no message; the caller keeps it spooled."""


def _header_field(value: str, limit: int) -> str:
    """A printable-ASCII header field of RFC 5424 (NILVALUE when empty)."""
    cleaned = "".join(c for c in value if 33 <= ord(c) <= 126)[:limit]
    return cleaned or "-"


def format_message(xml: str, time: str, outcome: int, app_name: str, hostname: str, procid: str) -> bytes:
    severity = 5 if outcome == 0 else 4
    header = (
        f"<{FACILITY * 8 + severity}>1 {time} {_header_field(hostname, 255)} {_header_field(app_name, 48)}"
        f" {_header_field(procid, 128)} {MSGID} -"
    )
    return header.encode("ascii") + b" " + BOM + xml.encode("utf-8")


@dataclass
class Endpoint:
    transport: str  # "tls" or "udp"
    host: str
    port: int
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    timeout_s: float = 10.0


class TlsTransport:
    """One TLS connection to the repository, opened on demand, checked before each send:
    a repository that closed its side (stopped, restarted) is noticed before a message is
    written into a dead connection, and the connection is opened again."""

    def __init__(self, endpoint: Endpoint):
        self.endpoint = endpoint
        self.sock: ssl.SSLSocket | None = None
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=endpoint.ca_file or None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if endpoint.cert_file:
            context.load_cert_chain(endpoint.cert_file, endpoint.key_file or None)
        self.context = context

    def _closed_by_peer(self) -> bool:
        readable, _, _ = select.select([self.sock], [], [], 0)
        if not readable:
            return False
        # Readable is either closing or a TLS record that carries no data (a TLS 1.3 session
        # ticket): read without blocking to tell which; a repository sends no data itself.
        self.sock.setblocking(False)
        try:
            return self.sock.recv(1) == b""
        except (ssl.SSLWantReadError, BlockingIOError):
            return False
        except OSError:
            return True
        finally:
            self.sock.settimeout(self.endpoint.timeout_s)

    def send(self, message: bytes) -> None:
        try:
            if self.sock is not None and self._closed_by_peer():
                self.close()
            if self.sock is None:
                raw = socket.create_connection((self.endpoint.host, self.endpoint.port), self.endpoint.timeout_s)
                try:
                    self.sock = self.context.wrap_socket(raw, server_hostname=self.endpoint.host)
                except BaseException:
                    raw.close()
                    raise
            self.sock.sendall(str(len(message)).encode() + b" " + message)
        except (OSError, ValueError) as exc:
            self.close()
            raise SendError(str(exc) or type(exc).__name__) from exc

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None


class UdpTransport:
    """One datagram per message on a connected socket. UDP says nothing of delivery: a
    message sent while the repository is down is lost unless the host answers ICMP
    port-unreachable, which surfaces as an error on a later send (then it is kept). A message
    larger than one datagram is not sent (cut, it would be invalid XML): it stays in the
    audit file, with a WARNING."""

    def __init__(self, endpoint: Endpoint):
        self.endpoint = endpoint
        self.sock: socket.socket | None = None

    def send(self, message: bytes) -> None:
        if len(message) > UDP_MAX:
            log.warning(
                "audit message of %d bytes exceeds the largest UDP datagram (%d): not sent to the repository;"
                " it is in the audit file",
                len(message),
                UDP_MAX,
            )
            return
        try:
            if self.sock is None:
                info = socket.getaddrinfo(self.endpoint.host, self.endpoint.port, type=socket.SOCK_DGRAM)[0]
                self.sock = socket.socket(info[0], socket.SOCK_DGRAM)
                self.sock.connect(info[4])
            self.sock.send(message)
        except OSError as exc:
            self.close()
            raise SendError(str(exc) or type(exc).__name__) from exc

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def transport_for(endpoint: Endpoint) -> TlsTransport | UdpTransport:
    return TlsTransport(endpoint) if endpoint.transport == "tls" else UdpTransport(endpoint)


def local_identity() -> tuple[str, str]:
    """HOSTNAME and PROCID of this process's messages."""
    return socket.gethostname(), str(os.getpid())

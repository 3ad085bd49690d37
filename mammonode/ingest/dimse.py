"""The DIMSE listener: C-ECHO and C-STORE for every storage SOP class, every transfer syntax.

Incoming data sets are spooled to a temporary file by pynetdicom (never held whole in
memory), then handed to :func:`mammonode.ingest.store.ingest`; the C-STORE response is
sent only after ingest returns, i.e. after the instance is on disk and in the database.
One log line per association; studies are named by UID only, never by patient.

Spool files live in ``<storage>/tmp/spool`` (not the system temp dir, whose filling up
would stop storing): pynetdicom removes a request's file once its handler returns, but not
the file of a transfer cut short (abort, dropped connection), so a sweep removes spool files
untouched for longer than any live association leaves its file (:meth:`spool_max_age`),
and start-up recovery removes everything under ``tmp/``.

Every PDU's declared length is checked before pynetdicom reads its body
(:func:`_bound_pdu_reads`): beyond ``node.max_pdu`` (advertised to the peer) plus
:data:`PDU_MARGIN` the association is aborted without reading, so a peer cannot make the
listener buffer a PDU of gigabytes.

With TLS, the handshake runs in the connection's own thread with the ACSE timeout
(:class:`HandshakeInThreadServer`), never in the accept loop: a client that connects and
never sends its ClientHello would otherwise stop every other association.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, _config, dimse_messages, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from mammonode import audit
from mammonode.config import Config
from mammonode.db.session import Database
from mammonode.ingest import commitment
from mammonode.ingest.layout import StorageLayout, ensure_dir
from mammonode.ingest.rules import match
from mammonode.ingest.store import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, IngestResult, StoreError, ingest
from mammonode.metrics import METRICS, sop_class_label

log = logging.getLogger(__name__)

# A peer's PDU may declare up to node.max_pdu (what we advertise); this much more is
# tolerated for peers that count the PDU header or item headers in (and an A-ASSOCIATE-RQ
# with many presentation contexts is a few KB). Beyond it the association is aborted unread.
PDU_MARGIN = 64 * 1024
# A-ABORT PDU: source 2 (service provider), reason 6 (invalid PDU parameter value).
A_ABORT_INVALID_PARAMETER = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 2, 6])


def _any_uid(value: object) -> tuple[bool, str]:
    """Let malformed UIDs in a request reach the C-STORE handler, which refuses them with a
    failure status; pynetdicom's own check would abort the whole association instead."""
    return isinstance(value, str), ""


def configure_pynetdicom() -> None:
    """pynetdicom's process-wide settings this listener relies on, set when it starts."""
    # Spool incoming data sets to disk instead of memory (bounded RSS under load).
    _config.STORE_RECV_CHUNKED_DATASET = True
    # Do not log identifying data-set contents from pynetdicom's debug output.
    _config.LOG_HANDLER_LEVEL = "none"
    _config.VALIDATORS["UI"] = _any_uid


def spool_into(spool_dir: Path) -> None:
    """Make pynetdicom spool incoming C-STORE data sets into ``spool_dir``.

    pynetdicom calls ``NamedTemporaryFile(delete=False, ...)`` by the name its
    ``dimse_messages`` module imported; rebinding that one name (instead of the process-wide
    ``tempfile.tempdir``) moves only these files and leaves every other temporary file of
    the process where it was. One process serves one storage directory: the listener that
    starts last decides."""
    ensure_dir(spool_dir)

    def spool_file(*args, **kwargs):
        try:
            return tempfile.NamedTemporaryFile(*args, **kwargs, dir=str(spool_dir))
        except FileNotFoundError:  # the spool directory was removed under us
            try:
                os.makedirs(spool_dir, exist_ok=True)
                return tempfile.NamedTemporaryFile(*args, **kwargs, dir=str(spool_dir))
            except OSError:
                pass
        except OSError:  # storage read-only or full: spool where pynetdicom would, so the
            pass  # C-STORE handler still runs and answers its failure status (0xA700)
        return tempfile.NamedTemporaryFile(*args, **kwargs)

    dimse_messages.NamedTemporaryFile = functools.update_wrapper(spool_file, tempfile.NamedTemporaryFile)


def _bound_pdu_reads(assoc_socket, limit: int) -> None:
    """Abort the association when a PDU's header declares more than ``limit`` bytes.

    pynetdicom's DUL reads a PDU as ``recv(6)`` (type and length) and then
    ``recv(declared length)`` into one growing buffer, whatever the length says. This wraps
    that one socket's ``recv`` (the per-connection :class:`AssociationSocket`, nothing
    process-wide): a read longer than ``limit`` sends an A-ABORT, closes the connection and
    returns nothing, which the DUL handles as a transport that closed mid-PDU (the
    association ends as aborted)."""
    recv = assoc_socket.recv

    def bounded_recv(nr_bytes: int) -> bytearray:
        if nr_bytes <= limit:
            return recv(nr_bytes)
        raw = assoc_socket.socket
        peer = "?"
        try:
            peer = "{}:{}".format(*raw.getpeername()[:2])
            raw.settimeout(1.0)
            raw.sendall(A_ABORT_INVALID_PARAMETER)
        except (OSError, ValueError):
            pass
        try:
            raw.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        log.warning(
            "association from %s aborted: a PDU declares %d bytes, more than node.max_pdu + %d (%d); not read",
            peer,
            nr_bytes,
            PDU_MARGIN,
            limit,
        )
        return bytearray()

    assoc_socket.recv = bounded_recv


class HandshakeInThreadServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, with the TLS handshake moved out of the accept loop.

    pynetdicom wraps each accepted socket in ``get_request``, i.e. in the one thread that
    accepts, on a socket without timeout: a peer that never sends its ClientHello blocks
    every later connection. Here ``get_request`` only accepts, and the handshake runs in the
    connection's thread with ``handshake_timeout_s``; a failed or timed-out handshake is one
    log line and a closed socket. Request threads are daemons and not joined at shutdown, so
    a handshake still in progress does not delay the node's stop."""

    daemon_threads = True
    block_on_close = False
    handshake_timeout_s: float = 5.0

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        return self.socket.accept()

    def process_request_thread(self, request, client_address) -> None:
        if self.ssl_context is not None:
            request = self._handshake(request, client_address)
            if request is None:
                return
        super().process_request_thread(request, client_address)

    def _handshake(self, raw: socket.socket, client_address) -> ssl.SSLSocket | None:
        """The server side of the TLS handshake within ``handshake_timeout_s`` (in total, not
        per read), then the socket back in blocking mode as pynetdicom expects it."""
        peer = "{}:{}".format(*client_address[:2])
        try:
            raw.settimeout(self.handshake_timeout_s)
            tls = self.ssl_context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
        except (OSError, ValueError) as exc:
            log.warning("TLS handshake with %s failed: %s", peer, exc)
            raw.close()
            return None
        try:
            tls.do_handshake()
            tls.settimeout(None)
            return tls
        except TimeoutError:
            log.warning("TLS handshake with %s not completed within %.1f s; closed", peer, self.handshake_timeout_s)
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError) as exc:
            # The peer closed first: a TCP probe (load balancer, port check), not an attack.
            log.info("TLS handshake with %s ended by the peer: %s", peer, exc)
        except ssl.SSLError as exc:
            log.warning("TLS handshake with %s failed: %s", peer, exc.reason or exc)
        except (OSError, ValueError) as exc:
            log.warning("TLS handshake with %s failed: %s", peer, exc)
        tls.close()
        return None


@dataclass
class AssociationState:
    """What the listener tracks per association (pynetdicom's objects stay untouched)."""

    started: float
    last_pdu: float
    # For the audit trail: per study received, its patient and SOP class counts; whether
    # any instance was new (action C) or all were already held (U); refused C-STOREs.
    studies: dict[str, audit.StudyObjects] = field(default_factory=dict)
    new_in: set[str] = field(default_factory=set)
    refused: int = 0


def failure_status(code: int, comment: str) -> Dataset:
    """A C-STORE response status with its Error Comment (at most 64 characters, LO)."""
    status = Dataset()
    status.Status = code
    status.ErrorComment = comment[:64]
    return status


def store_request(event, cfg: Config, storage_dir: Path, db: Database, calling_ae: str) -> IngestResult:
    """One C-STORE request's data set through :func:`ingest`: checked against the request's
    UIDs and routed by the rules as sent by ``calling_ae`` (the listener's C-STOREs and
    those a C-GET pull receives). Raises StoreError for a refusal."""
    request = event.request
    return ingest(
        Path(event.dataset_path),
        storage_dir,
        db,
        calling_ae=calling_ae,
        expected_sop_uid=str(request.AffectedSOPInstanceUID),
        expected_sop_class=str(request.AffectedSOPClassUID),
        max_inflated_bytes=cfg.storage.max_inflated_bytes,
        router=functools.partial(match, cfg.rules, calling_ae=calling_ae),
    )


class DimseListener:
    def __init__(self, cfg: Config, db: Database):
        self.cfg = cfg
        self.db = db
        self.storage_dir = cfg.storage_dir
        self.server = None
        self.accepting = True
        self._associations: dict[int, AssociationState] = {}
        self._lock = threading.Lock()
        self.spool_dir = StorageLayout(cfg.storage_dir).tmp_dir / "spool"
        self._in_ingest: set[str] = set()  # names of spool files a C-STORE handler is reading
        self._sweeping = threading.Event()
        self._sweeper: threading.Thread | None = None

    def _state(self, assoc) -> AssociationState | None:
        with self._lock:
            return self._associations.get(id(assoc))

    def build_ae(self) -> AE:
        node = self.cfg.node
        ae = AE(ae_title=node.ae_title)
        ae.maximum_associations = node.max_associations
        ae.maximum_pdu_size = node.max_pdu
        ae.network_timeout = node.network_timeout_s
        # A connection that never sends an A-ASSOCIATE-RQ (a load balancer's TCP health check)
        # holds one of the max_associations slots until this expires; real peers ask at once.
        ae.acse_timeout = node.acse_timeout_s
        ae.dimse_timeout = node.network_timeout_s
        ae.require_called_aet = node.require_called_aet
        ae.require_calling_aet = list(node.allowed_calling_aets)
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        commitment.add_context(ae)  # storage commitment reports from destinations
        return ae

    def ssl_context(self) -> ssl.SSLContext | None:
        node = self.cfg.node
        if not node.tls:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(certfile=node.tls_cert, keyfile=node.tls_key)
        if node.tls_client_ca:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cafile=node.tls_client_ca)
        return context

    # -- handlers -------------------------------------------------------------------------
    def _handle_store(self, event) -> Dataset | int:
        assoc = event.assoc
        calling = assoc.requestor.ae_title
        if not self.accepting:
            return failure_status(OUT_OF_RESOURCES, "node is shutting down")
        request = event.request
        spool_file = Path(event.dataset_path).name
        with self._lock:
            self._in_ingest.add(spool_file)
        try:
            result = store_request(event, self.cfg, self.storage_dir, self.db, calling)
        except StoreError as exc:
            self._audit_refused(assoc)
            METRICS.instances.labels(sop_class_label(request.AffectedSOPClassUID), "failed", "dimse").inc()
            log.warning("C-STORE refused: status 0x%04X %s (calling AE %s)", exc.status, exc.comment, calling)
            return failure_status(exc.status, exc.comment)
        except Exception as exc:  # never crash the association thread, never claim success
            log.exception("C-STORE failed unexpectedly")
            return failure_status(CANNOT_UNDERSTAND, f"internal error: {type(exc).__name__}")
        finally:
            with self._lock:
                self._in_ingest.discard(spool_file)
        METRICS.instances.labels(sop_class_label(request.AffectedSOPClassUID), str(result.outcome), "dimse").inc()
        self._audit_stored(assoc, result, str(request.AffectedSOPClassUID))
        log.debug(
            "stored instance %s of study %s (%s)", result.sop_instance_uid, result.study_instance_uid, result.outcome
        )
        return 0x0000

    # -- audit trail ----------------------------------------------------------------------
    def _audit_stored(self, assoc, result, sop_class_uid: str) -> None:
        state = self._state(assoc)
        if state is None or result.path is None:  # dropped by a rule: nothing was kept
            return
        study = state.studies.setdefault(result.study_instance_uid, audit.StudyObjects(result.study_instance_uid))
        study.patient_id = study.patient_id or result.patient_id
        study.add(sop_class_uid)
        if result.outcome != "duplicate":
            state.new_in.add(result.study_instance_uid)

    def _audit_refused(self, assoc) -> None:
        state = self._state(assoc)
        if state is not None:
            state.refused += 1

    def _audit_association(self, assoc, state: AssociationState, how: str) -> None:
        """One 110104 per study the association stored (IHE practice: per association and
        study), the caller as source, this node as destination."""
        ctx = audit.context()
        if ctx is None:
            return
        peer = audit.Participant(assoc.requestor.ae_title, True, audit.messages.SOURCE, str(assoc.requestor.address))
        us = ctx.node(False, audit.messages.DESTINATION, str(assoc.acceptor.address or ""))
        problems = []
        if state.refused:
            problems.append(f"{state.refused} C-STORE requests of this association refused")
        if how == "aborted":
            problems.append("association aborted")
        for uid, study in state.studies.items():
            audit.emit(
                audit.messages.instances_transferred(
                    ctx.source,
                    peer,
                    us,
                    study,
                    action="C" if uid in state.new_in else "U",
                    outcome=audit.messages.MINOR_FAILURE if problems else audit.messages.SUCCESS,
                    description="; ".join(problems),
                )
            )

    def _audit_rejected(self, assoc, reason: str) -> None:
        ctx = audit.context()
        if ctx is None:
            return
        address = str(assoc.requestor.address)
        audit.emit_security_alert(  # rate-limited per address
            audit.Participant(assoc.requestor.ae_title.strip() or "-", True, None, address),
            f"{ctx.ae_title}@{self.cfg.node.host}:{self.port}",
            f"association from {assoc.requestor.ae_title.strip()!r} at {address} rejected: {reason}",
            audit.messages.NODE_AUTHENTICATION,
        )

    def _handle_conn_open(self, event) -> None:
        max_pdu = self.cfg.node.max_pdu
        if max_pdu > 0:
            _bound_pdu_reads(event.assoc.dul.socket, max_pdu + PDU_MARGIN)

    def _handle_accepted(self, event) -> None:
        METRICS.associations.labels("accepted").inc()
        METRICS.active_associations.inc()
        now = time.monotonic()
        with self._lock:
            self._associations[id(event.assoc)] = AssociationState(started=now, last_pdu=now)

    def _handle_pdu(self, event) -> None:
        state = self._state(event.assoc)
        if state is not None:
            state.last_pdu = time.monotonic()

    def _handle_released(self, event, how: str) -> None:
        assoc = event.assoc
        METRICS.active_associations.dec()
        METRICS.associations.labels(how).inc()
        with self._lock:
            state = self._associations.pop(id(assoc), None)
        seconds = time.monotonic() - state.started if state else 0.0
        if state is not None and state.studies:
            self._audit_association(assoc, state, how)
        log.info(
            "association %s: calling AE %s from %s:%s, %.1f s",
            how,
            assoc.requestor.ae_title,
            assoc.requestor.address,
            assoc.requestor.port,
            seconds,
        )

    def _rejection_reason(self, assoc) -> str:
        """Why pynetdicom rejected the request, by the same checks it makes (its event does
        not carry the reason)."""
        node = self.cfg.node
        calling = assoc.requestor.ae_title.strip()
        request = assoc.requestor.primitive
        called = str(getattr(request, "called_ae_title", "") or "").strip()
        if node.allowed_calling_aets and calling not in [a.strip() for a in node.allowed_calling_aets]:
            return "calling AE title not in node.allowed_calling_aets"
        if node.require_called_aet and called and called != node.ae_title.strip():
            return f"called AE title {called!r} is not {node.ae_title!r}"
        if self.server is not None and len(self.server.active_associations) > node.max_associations:
            return f"node.max_associations ({node.max_associations}) reached"
        return "refused by the association checks"

    def _handle_rejected(self, event) -> None:
        METRICS.associations.labels("rejected").inc()
        assoc = event.assoc
        reason = self._rejection_reason(assoc)
        log.warning(
            "association rejected: calling AE %s from %s: %s", assoc.requestor.ae_title, assoc.requestor.address, reason
        )
        self._audit_rejected(assoc, reason)

    # -- spool sweep ----------------------------------------------------------------------
    def spool_max_age(self) -> float:
        """How long a spool file may go unwritten before it counts as an aborted transfer's.

        While a data set arrives its file is written at every P-DATA PDU, and a peer silent
        for ``network_timeout_s`` is dropped; once complete the file is read by the handler,
        which the sweep skips. So a file untouched for twice the network timeout belongs to
        no live transfer."""
        node = self.cfg.node
        configured = node.spool_max_age_s or 2 * node.network_timeout_s + 60.0
        return max(configured, 2 * node.network_timeout_s)

    def sweep_spool(self, now: float | None = None) -> int:
        """Remove spool files older than :meth:`spool_max_age` that no handler is reading."""
        limit = (time.time() if now is None else now) - self.spool_max_age()
        removed = 0
        try:
            entries = list(os.scandir(self.spool_dir))
        except FileNotFoundError:
            return 0
        for entry in entries:
            try:
                if not entry.is_file(follow_symlinks=False) or entry.stat().st_mtime > limit:
                    continue
                with self._lock:
                    if entry.name in self._in_ingest:
                        continue
                os.unlink(entry.path)
                removed += 1
            except FileNotFoundError:
                continue
        if removed:
            log.warning("removed %d spool files of aborted DIMSE transfers from %s", removed, self.spool_dir)
        return removed

    def _sweep_loop(self) -> None:
        interval = max(0.5, min(60.0, self.spool_max_age() / 4))
        while not self._sweeping.wait(interval):
            try:
                self.sweep_spool()
            except OSError:
                log.exception("spool sweep failed")

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        node = self.cfg.node
        handlers = [
            (evt.EVT_C_STORE, self._handle_store),
            (evt.EVT_CONN_OPEN, self._handle_conn_open),
            (evt.EVT_ACCEPTED, self._handle_accepted),
            (evt.EVT_RELEASED, self._handle_released, ["released"]),
            (evt.EVT_ABORTED, self._handle_released, ["aborted"]),
            (evt.EVT_REJECTED, self._handle_rejected),
            (evt.EVT_PDU_RECV, self._handle_pdu),
            (evt.EVT_N_EVENT_REPORT, lambda event: commitment.handle_event_report(self.cfg, self.db, event)),
        ]
        configure_pynetdicom()
        spool_into(self.spool_dir)
        self.ae = self.build_ae()
        # pynetdicom's start_server, with the server class that keeps TLS handshakes out of the
        # accept loop (start_server takes no server class).
        server = self.ae.make_server(
            (node.host, node.port),
            evt_handlers=handlers,
            ssl_context=self.ssl_context(),
            server_class=HandshakeInThreadServer,
        )
        server.handshake_timeout_s = node.acse_timeout_s
        self.ae._servers.append(server)  # where AE.shutdown and server.shutdown expect it
        threading.Thread(target=server.serve_forever, name="dimse-accept", daemon=True).start()
        self.server = server
        log.info("DIMSE listener %s on %s:%s%s", node.ae_title, node.host, self.port, " (TLS)" if node.tls else "")
        self._sweeping.clear()
        self._sweeper = threading.Thread(target=self._sweep_loop, name="dimse-spool-sweep", daemon=True)
        self._sweeper.start()

    @property
    def port(self) -> int:
        return self.server.server_address[1] if self.server else self.cfg.node.port

    def active_associations(self) -> int:
        return len(self.server.active_associations) if self.server else 0

    def stop(self, grace_s: float = 30.0, idle_s: float = 2.0) -> None:
        """No new associations; associations still transferring (a PDU within ``idle_s``) get
        up to ``grace_s`` to finish, idle ones are closed at once. An instance whose transfer
        is cut short was never acknowledged, so the sender sends it again."""
        if self.server is None:
            return
        server = self.server
        server.shutdown()  # closes the listening socket; association threads carry on
        deadline = time.monotonic() + grace_s

        def busy() -> list:
            now = time.monotonic()
            states = [(a, self._state(a)) for a in server.active_associations]
            return [a for a, state in states if state is not None and now - state.last_pdu < idle_s]

        while time.monotonic() < deadline and busy():
            time.sleep(0.1)
        self.accepting = False
        aborted = list(server.active_associations)
        for assoc in aborted:
            assoc.abort()
        for assoc in aborted:
            assoc.join(timeout=5)
        self.server = None
        self._sweeping.set()
        # No association is left: every spool file now belongs to a transfer that was cut
        # short (never acknowledged), so none outlives the listener.
        self.sweep_spool(now=time.time() + self.spool_max_age() + 1)
        log.info("DIMSE listener stopped")

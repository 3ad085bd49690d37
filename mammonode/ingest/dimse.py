"""The DIMSE listener: C-ECHO and C-STORE for every storage SOP class, every transfer syntax.

Incoming data sets are spooled to a temporary file by pynetdicom (never held whole in
memory), then handed to :func:`mammonode.ingest.store.ingest`; the C-STORE response is
sent only after ingest returns, i.e. after the instance is on disk and in the database.
One log line per association; studies are named by UID only, never by patient.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, _config, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification

from mammonode.config import Config
from mammonode.db.session import Database
from mammonode.ingest.store import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, StoreError, ingest
from mammonode.metrics import METRICS

log = logging.getLogger(__name__)


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


@dataclass
class AssociationState:
    """What the listener tracks per association (pynetdicom's objects stay untouched)."""

    started: float
    last_pdu: float


def _status(code: int, comment: str) -> Dataset:
    status = Dataset()
    status.Status = code
    status.ErrorComment = comment[:64]
    return status


class DimseListener:
    def __init__(self, cfg: Config, db: Database):
        self.cfg = cfg
        self.db = db
        self.storage_dir = cfg.storage_dir
        self.server = None
        self.accepting = True
        self._associations: dict[int, AssociationState] = {}
        self._lock = threading.Lock()

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
            return _status(OUT_OF_RESOURCES, "node is shutting down")
        request = event.request
        try:
            result = ingest(
                Path(event.dataset_path),
                self.storage_dir,
                self.db,
                calling_ae=calling,
                expected_sop_uid=str(request.AffectedSOPInstanceUID),
                expected_sop_class=str(request.AffectedSOPClassUID),
            )
        except StoreError as exc:
            METRICS.instances.labels(str(request.AffectedSOPClassUID), "failed", "dimse").inc()
            log.warning("C-STORE refused: status 0x%04X %s (calling AE %s)", exc.status, exc.comment, calling)
            return _status(exc.status, exc.comment)
        except Exception as exc:  # never crash the association thread, never claim success
            log.exception("C-STORE failed unexpectedly")
            return _status(CANNOT_UNDERSTAND, f"internal error: {type(exc).__name__}")
        METRICS.instances.labels(str(request.AffectedSOPClassUID), str(result.outcome), "dimse").inc()
        log.debug(
            "stored instance %s of study %s (%s)", result.sop_instance_uid, result.study_instance_uid, result.outcome
        )
        return 0x0000

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
        log.warning(
            "association rejected: calling AE %s from %s: %s",
            assoc.requestor.ae_title,
            assoc.requestor.address,
            self._rejection_reason(assoc),
        )

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        node = self.cfg.node
        handlers = [
            (evt.EVT_C_STORE, self._handle_store),
            (evt.EVT_ACCEPTED, self._handle_accepted),
            (evt.EVT_RELEASED, self._handle_released, ["released"]),
            (evt.EVT_ABORTED, self._handle_released, ["aborted"]),
            (evt.EVT_REJECTED, self._handle_rejected),
            (evt.EVT_PDU_RECV, self._handle_pdu),
        ]
        configure_pynetdicom()
        self.ae = self.build_ae()
        self.server = self.ae.start_server(
            (node.host, node.port), block=False, evt_handlers=handlers, ssl_context=self.ssl_context()
        )
        log.info("DIMSE listener %s on %s:%s%s", node.ae_title, node.host, self.port, " (TLS)" if node.tls else "")

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
        for assoc in list(server.active_associations):
            assoc.abort()
        self.server = None
        log.info("DIMSE listener stopped")

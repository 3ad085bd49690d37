"""The sender loops: one per destination, each claiming that destination's due outbox rows,
handing them to its transport (delivery/) and recording what came back, so a destination that
accepts and never answers holds up only its own rows; one more resolves rows of destinations
no longer configured. Result UIDs are stable, so a re-send after a crash replaces the copy at
the PACS rather than duplicating it.

Each claim names this host and process (``outbox.Claimer``): at start-up the rows a killed
process on this host left ``sending`` go back to pending at once (``release_dead_claims``)."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time

from mammonode import audit, delivery
from mammonode.config import Config, Destination
from mammonode.db import commitment, outbox
from mammonode.db.models import Delivery, NotifyDelivery
from mammonode.db.session import Database
from mammonode.delivery.commitment import Requested
from mammonode.delivery.commitment import request_commitment as request_commitment_from
from mammonode.delivery.status import Item, Outcome, is_delivered
from mammonode.metrics import METRICS
from mammonode.service.loop import Loop

log = logging.getLogger(__name__)

HOST = socket.gethostname()[:64]
# Tells this process from an earlier one with the same pid (a container restarts as pid 1).
PROCESS_TOKEN = secrets.token_hex(4)
RELEASE_INTERVAL_S = 60.0  # how often the housekeeping sender looks for dead claimers again


def claimer(name: str) -> outbox.Claimer:
    return outbox.Claimer(HOST, os.getpid(), PROCESS_TOKEN, name)


def claimer_alive(who: outbox.Claimer) -> bool:
    """Whether a claimer on this host may still be sending: this process, or another process
    that still exists (a pid reused by an unrelated process keeps its rows until the claim
    timeout, which errs on the side of not sending twice)."""
    if who.pid == os.getpid():
        return who.token == PROCESS_TOKEN
    try:
        os.kill(who.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user
        return True
    return True


def release_dead_claims(db: Database) -> int:
    """Rows a dead process on this host left ``sending`` (result deliveries and webhook
    deliveries) back to pending; logged when any."""
    released = 0
    for model, what in ((Delivery, "deliveries"), (NotifyDelivery, "webhook deliveries")):
        with db.session() as session:
            count = outbox.release_dead_claims(session, HOST, claimer_alive, model)
        if count:
            log.warning("released %d %s left in flight by a process that is gone", count, what)
        released += count
    return released


class DeliverySender(Loop):
    """Sends due rows: of ``destination`` only; with ``unconfigured``, of every destination
    no longer configured (recorded as failed attempts); with neither, of every destination
    in one loop."""

    name = "sender"

    def __init__(self, cfg: Config, db: Database, destination: str | None = None, *, unconfigured: bool = False):
        super().__init__(interval_s=cfg.delivery.poll_interval_s)
        if destination is not None and unconfigured:
            raise ValueError("a sender serves one destination or the unconfigured ones, not both")
        self.cfg = cfg
        self.db = db
        self.destination = destination
        self.unconfigured = unconfigured
        if destination is not None:
            self.name = f"sender-{destination}"
        elif unconfigured:
            self.name = "sender-unconfigured"
        self.claimer = str(claimer(self.name))
        self._next_release = time.monotonic() + RELEASE_INTERVAL_S

    def run_once(self) -> bool:
        destinations = {d.name: d for d in self.cfg.destinations}
        if self.unconfigured and time.monotonic() >= self._next_release:
            # Another node on this host (shared PostgreSQL) may have died since start-up.
            self._next_release = time.monotonic() + RELEASE_INTERVAL_S
            release_dead_claims(self.db)
        with self.db.session() as session:
            if self.destination is not None:
                claimed = outbox.claim_due(session, self.claimer, destinations=[self.destination])
            elif self.unconfigured:
                claimed = outbox.claim_due(session, self.claimer, excluding=list(destinations))
            else:
                claimed = outbox.claim_due(session, self.claimer)
        batches: dict[str, list[Item]] = {}
        study_of = {}
        for row in claimed:
            batches.setdefault(row.destination, []).append(
                (row.delivery_id, self.cfg.storage_dir / row.path, row.sop_class_uid)
            )
            study_of[row.delivery_id] = row.study_instance_uid
        for name, items in batches.items():
            dest = destinations.get(name)
            if dest is None:
                outcome = {i: (None, f"destination {name!r} is no longer configured") for i, _, _ in items}
            else:
                outcome = delivery.send(dest, items, self.cfg.node.ae_title, self.cfg.delivery.timeout_s)
            self._record(name, outcome, study_of)
            if dest is not None:
                audit_sent(self.db, dest, items, outcome, study_of)
            if dest is not None and dest.storage_commitment:
                delivered = [i for i, (status, _) in outcome.items() if is_delivered(status)]
                if delivered:
                    request_commitment(self.cfg, self.db, dest, delivered)
        for dest in destinations.values():
            if dest.storage_commitment and (self.destination in (None, dest.name)) and not self.unconfigured:
                with self.db.session() as session:
                    commitment.expire(session, dest.name, dest.commitment_timeout_s)
        return bool(claimed)

    def _record(self, destination: str, outcome: Outcome, study_of: dict[int, str]) -> None:
        attempts = {}
        for delivery_id, (status, message) in outcome.items():
            delivered = is_delivered(status)
            METRICS.deliveries.labels(destination, "delivered" if delivered else "error").inc()
            attempts[delivery_id] = outbox.Attempt(delivered, status, message)
        d = self.cfg.delivery
        with self.db.session() as session:
            outbox.record_attempts(
                session, destination, attempts, study_of, d.max_attempts, (d.backoff_initial_s, d.backoff_max_s)
            )
        delivered = sum(1 for a in attempts.values() if a.delivered)
        if delivered == len(attempts):
            log.info("delivery to %s: %d of %d objects delivered", destination, delivered, len(attempts))
        else:
            reasons = sorted({a.message for a in attempts.values() if not a.delivered})
            log.warning(
                "delivery to %s: %d of %d objects delivered; failed: %s",
                destination,
                delivered,
                len(attempts),
                "; ".join(reasons)[:500],
            )


def request_commitment(cfg: Config, db: Database, dest: Destination, delivery_ids: list[int]) -> None:
    """Storage commitment for rows just delivered to ``dest``: the Transaction UID is stored
    first, then the N-ACTION sent; a report on the same association is applied at once, one
    on a new association by the listener (ingest/dimse.py)."""
    d = cfg.delivery
    backoff = (d.backoff_initial_s, d.backoff_max_s)
    with db.session() as session:
        transaction_uid, references = commitment.prepare(session, delivery_ids)
    if not references:
        return
    try:
        asked = request_commitment_from(dest, transaction_uid, references, cfg.node.ae_title, d.timeout_s)
    except Exception as exc:  # pynetdicom or TLS errors past the connect; the rows must not stay committing
        asked = Requested(False, f"{type(exc).__name__}: {exc}")
    applied = None
    with db.session() as session:
        if not asked.accepted:
            commitment.request_failed(session, transaction_uid, asked.message, d.max_attempts, backoff)
        elif asked.report is not None:
            report = commitment.report_from_dataset(asked.report)
            applied = commitment.apply_report(session, report, d.max_attempts, backoff)
    if not asked.accepted:
        log.warning("storage commitment request to %s failed: %s", dest.name, asked.message)
        return
    log.info(
        "storage commitment of %d objects requested from %s (transaction %s)",
        len(references),
        dest.name,
        transaction_uid,
    )
    if applied is not None:
        log.info(
            "storage commitment report from %s on the same association, transaction %s: %d committed, %d to send again",
            dest.name,
            transaction_uid,
            applied.committed,
            applied.resent,
        )


def audit_sent(db: Database, dest: Destination, items: list[Item], outcome: Outcome, study_of: dict[int, str]) -> None:
    """110104 (action R) per study with objects this attempt delivered: this node as source,
    the destination as destination."""
    ctx = audit.context()
    if ctx is None:
        return
    from mammonode.db.models import Study

    studies: dict[str, audit.StudyObjects] = {}
    for delivery_id, _path, sop_class_uid in items:
        if is_delivered(outcome.get(delivery_id, (None, ""))[0]):
            uid = study_of[delivery_id]
            studies.setdefault(uid, audit.StudyObjects(uid)).add(sop_class_uid)
    if not studies:
        return
    with db.session() as session:
        for row in session.query(Study.study_instance_uid, Study.patient_id).filter(
            Study.study_instance_uid.in_(list(studies))
        ):
            studies[row.study_instance_uid].patient_id = row.patient_id or ""
    target = audit.Participant(dest.ae_title or dest.url, False, audit.messages.DESTINATION, dest.host)
    for study in studies.values():
        audit.emit(
            audit.messages.instances_transferred(
                ctx.source, ctx.node(True, audit.messages.SOURCE), target, study, action="R"
            )
        )


def senders(cfg: Config, db: Database) -> list[DeliverySender]:
    """One sender per configured destination, and one for rows of destinations that are no
    longer configured (which also looks for dead claimers on this host now and then)."""
    return [DeliverySender(cfg, db, d.name) for d in cfg.destinations] + [DeliverySender(cfg, db, unconfigured=True)]

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

from mammonode import delivery
from mammonode.config import Config
from mammonode.db import outbox
from mammonode.db.session import Database
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
    """Rows a dead process on this host left ``sending`` back to pending; logged when any."""
    with db.session() as session:
        released = outbox.release_dead_claims(session, HOST, claimer_alive)
    if released:
        log.warning("released %d deliveries left in flight by a process that is gone", released)
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


def senders(cfg: Config, db: Database) -> list[DeliverySender]:
    """One sender per configured destination, and one for rows of destinations that are no
    longer configured (which also looks for dead claimers on this host now and then)."""
    return [DeliverySender(cfg, db, d.name) for d in cfg.destinations] + [DeliverySender(cfg, db, unconfigured=True)]

"""The sender loop: claims due outbox rows, hands each destination's batch to its transport
(delivery/), and records what came back. Result UIDs are stable, so a re-send after a crash
replaces the copy at the PACS rather than duplicating it."""

from __future__ import annotations

import logging
import socket
from collections import defaultdict

from mammonode import delivery
from mammonode.config import Config
from mammonode.db import outbox
from mammonode.db.session import Database
from mammonode.delivery.status import Item, Outcome, is_delivered
from mammonode.metrics import METRICS
from mammonode.service.loop import Loop

log = logging.getLogger(__name__)


class DeliverySender(Loop):
    name = "sender"

    def __init__(self, cfg: Config, db: Database, name: str = "sender"):
        super().__init__(interval_s=cfg.delivery.poll_interval_s)
        self.cfg = cfg
        self.db = db
        self.claimer = f"{socket.gethostname()}:{name}"

    def run_once(self) -> bool:
        destinations = {d.name: d for d in self.cfg.destinations}
        with self.db.session() as session:
            claimed = outbox.claim_due(session, self.claimer)
        batches: dict[str, list[Item]] = defaultdict(list)
        study_of = {}
        for row in claimed:
            batches[row.destination].append((row.delivery_id, self.cfg.storage_dir / row.path, row.sop_class_uid))
            study_of[row.delivery_id] = row.study_instance_uid
        for name, items in batches.items():
            dest = destinations.get(name)
            if dest is None:
                outcome = {i: (None, f"destination {name!r} is no longer configured") for i, _, _ in items}
            else:
                outcome = delivery.send(dest, items, self.cfg.node.ae_title)
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

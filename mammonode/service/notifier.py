"""The notifier loops: one fans new events out to the configured [[notify]] hooks, and each
hook has its own sender (so a hook that hangs holds up only its own notifications), which
POSTs its due events one at a time, retried with the [delivery] backoff until the hook's
``max_attempts`` (db.notifications holds the rules).

The body is one JSON object::

    {"event": "result.ready", "event_id": "<UUID, the same on every retry>",
     "occurred_at": "...Z", "sent_at": "...Z", "attempt": 1,
     "node": {"ae_title": "MAMMONODE"},
     "study": {"study_instance_uid": "1.2..."},
     "details": {...}}

``details``: result.ready the scores, density, models and views; study.failed the error;
study.incomplete the missing views; delivery.failed the destination, objects and error.
Only a hook with ``include_phi`` gets ``patient`` (patient_id, patient_name,
accession_number). Logs name hooks and study UIDs, never URLs or patient values.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime

from mammonode import __version__
from mammonode.config import Config, NotifyHook
from mammonode.db import notifications, outbox
from mammonode.db.models import DeliveryState
from mammonode.db.session import Database
from mammonode.delivery.webhook import post_json
from mammonode.service.loop import Loop
from mammonode.service.sender import claimer

log = logging.getLogger(__name__)

PRUNE_INTERVAL_S = 3600.0


def _iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def payload(
    claimed: notifications.ClaimedNotification, ae_title: str, patient: dict | None, now: datetime | None = None
) -> dict:
    """The JSON body of one attempt; ``patient`` only for hooks with ``include_phi``."""
    body = {
        "event": claimed.kind,
        "event_id": claimed.event_uid,
        "occurred_at": _iso(claimed.at),
        "sent_at": _iso(now or datetime.now(UTC)),
        "attempt": claimed.attempt,
        "node": {"ae_title": ae_title},
        "study": {"study_instance_uid": claimed.study_instance_uid},
        "details": claimed.details,
    }
    if patient is not None:
        body["patient"] = patient
    return body


class NotifyDispatcher(Loop):
    """Makes each new event one delivery per hook that wants it; now and then deletes
    finished events older than ``notifications.KEEP_DAYS``."""

    name = "notify-dispatch"

    def __init__(self, cfg: Config, db: Database):
        super().__init__(interval_s=cfg.delivery.poll_interval_s)
        self.db = db
        self.wants = {hook.name: tuple(hook.events) for hook in cfg.notify}
        self._next_prune = 0.0

    def run_once(self) -> bool:
        with self.db.session() as session:
            dispatched = notifications.dispatch(session, self.wants)
        if time.monotonic() >= self._next_prune:
            self._next_prune = time.monotonic() + PRUNE_INTERVAL_S
            with self.db.session() as session:
                pruned = notifications.prune(session)
            if pruned:
                log.info("notify: %d finished events older than %d days deleted", pruned, notifications.KEEP_DAYS)
        return dispatched > 0


class HookSender(Loop):
    """Sends one hook's due notifications."""

    def __init__(self, cfg: Config, db: Database, hook: NotifyHook):
        super().__init__(interval_s=cfg.delivery.poll_interval_s)
        self.cfg = cfg
        self.db = db
        self.hook = hook
        self.name = f"notify-{hook.name}"
        self.claimer = str(claimer(self.name))
        # A claim older than this belongs to a sender that died mid-POST: due again.
        self.stale_after_s = 2 * hook.timeout_s + 60

    def run_once(self) -> bool:
        hook = self.hook
        with self.db.session() as session:
            claimed = notifications.claim_next(session, hook.name, self.claimer, self.stale_after_s)
            patient = None
            if claimed is not None and hook.include_phi:
                patient = notifications.patient_values(session, claimed.study_instance_uid)
        if claimed is None:
            return False
        body = json.dumps(payload(claimed, self.cfg.node.ae_title, patient), separators=(",", ":")).encode()
        headers = {
            "User-Agent": f"mammonode/{__version__}",
            "X-Mammonode-Event": claimed.kind,
            "X-Mammonode-Delivery": claimed.event_uid,
        }
        status, message = post_json(hook.url, body, headers, hook.timeout_s, hook.secret, int(time.time()))
        delivered = status is not None and 200 <= status < 300
        d = self.cfg.delivery
        with self.db.session() as session:
            state = notifications.record_attempt(
                session,
                claimed.delivery_id,
                delivered,
                status,
                message,
                hook.max_attempts,
                lambda attempts: outbox.backoff_seconds(attempts, d.backoff_initial_s, d.backoff_max_s),
            )
        study = claimed.study_instance_uid
        if delivered:
            log.info("notify %s: %s for study %s delivered (HTTP %s)", hook.name, claimed.kind, study, status)
        elif state == DeliveryState.FAILED:
            log.error(
                "notify %s: %s for study %s given up after %d attempts: %s",
                hook.name,
                claimed.kind,
                study,
                claimed.attempt,
                message,
            )
        else:
            log.warning(
                "notify %s: %s for study %s attempt %d failed: %s; will retry",
                hook.name,
                claimed.kind,
                study,
                claimed.attempt,
                message,
            )
        return True


def notifiers(cfg: Config, db: Database) -> list[Loop]:
    """The dispatcher (always: events are written whether or not hooks are configured) and
    one sender per hook."""
    return [NotifyDispatcher(cfg, db), *(HookSender(cfg, db, hook) for hook in cfg.notify)]

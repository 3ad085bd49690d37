"""Webhook notifications, durable like the delivery outbox.

An event row is written by the function that makes the state change it reports, in the
same transaction (``queue``): a result is never announced that was rolled back, and no
announcement is lost to a crash. The notifier (service/notifier.py) then fans each event
out to one delivery row per configured hook that wants it (``dispatch``), and each hook's
loop claims its due rows, POSTs them and records the attempt: delivered, retried after
backoff, or failed once the hook's attempts are used.

Events hold no PHI. A hook with ``include_phi`` gets the study's patient values, read when
the event is sent (``patient_values``).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from mammonode.db.models import DeliveryState, NotifyDelivery, NotifyEvent, Study, utcnow
from mammonode.db.records import record_event
from mammonode.db.session import locked
from mammonode.exam.views import VIEWS

RESULT_READY = "result.ready"
STUDY_FAILED = "study.failed"
STUDY_INCOMPLETE = "study.incomplete"
DELIVERY_FAILED = "delivery.failed"
HOOK_REMOVED = "hook no longer configured"  # last_error of the sends a removed hook leaves
KEEP_DAYS = 30  # finished events (every hook delivered or given up) are deleted after this


@dataclass(frozen=True)
class ClaimedNotification:
    delivery_id: int
    event_uid: str
    kind: str
    study_instance_uid: str | None
    details: dict
    at: datetime
    attempt: int  # this attempt's number, from 1


def queue(session: Session, kind: str, study_uid: str | None, details: dict) -> None:
    """An event for the hooks, in the caller's transaction (``details``: JSON, no PHI)."""
    session.add(NotifyEvent(uid=str(uuid.uuid4()), kind=kind, study_instance_uid=study_uid, details=details))


def result_summary(result: Mapping, note: str | None, version: str | None) -> dict:
    """What ``result.ready`` says of a job's result (``PipelineResult.as_dict()``): the
    scores and density, without the per-view geometry and timings."""
    views = [view for view in VIEWS if view in result.get("views", {})]
    out = {
        "views": views,
        "missing_views": [view for view in VIEWS if view not in views],
        "cancer": result.get("cancer", {}),
        "density": result.get("density", {}),
        "models": sorted(result.get("models", {})),
        "test_weights": bool(result.get("test_weights")),
        "result_version": version,
    }
    for key in ("images", "skipped", "notice"):
        if result.get(key):
            out[key] = result[key]
    if note:
        out["note"] = note
    return out


def dispatch(session: Session, wants: Mapping[str, Collection[str]], now: datetime | None = None) -> int:
    """Fan new events out: a pending delivery for each hook (``wants``: hook name -> the
    events it takes) that wants the event. Pending rows of hooks no longer configured are
    failed (said once, as an event). Returns the events dispatched."""
    now = now or utcnow()
    query = select(NotifyEvent).where(NotifyEvent.dispatched_at.is_(None)).order_by(NotifyEvent.id).limit(256)
    events = list(session.execute(locked(query, session, skip_locked=True)).scalars())
    for event in events:
        for hook, kinds in wants.items():
            if event.kind in kinds:
                event.deliveries.append(NotifyDelivery(hook=hook, state=DeliveryState.PENDING, next_attempt_at=now))
        event.dispatched_at = now
    orphans = session.execute(
        update(NotifyDelivery)
        .where(NotifyDelivery.state == DeliveryState.PENDING, NotifyDelivery.hook.not_in(list(wants)))
        .values(state=DeliveryState.FAILED, last_error=HOOK_REMOVED)
    )
    if orphans.rowcount:
        record_event(
            session, "WARNING", "notify-failed", f"{orphans.rowcount} notifications of hooks no longer configured"
        )
    return len(events)


def claim_next(
    session: Session, hook: str, claimer: str, stale_after_s: float, now: datetime | None = None
) -> ClaimedNotification | None:
    """The hook's oldest due delivery, claimed; a claim older than ``stale_after_s`` (its
    sender died mid-POST) is due again."""
    now = now or utcnow()
    session.execute(
        update(NotifyDelivery)
        .where(
            NotifyDelivery.hook == hook,
            NotifyDelivery.state == DeliveryState.SENDING,
            NotifyDelivery.claimed_at < now - timedelta(seconds=stale_after_s),
        )
        .values(state=DeliveryState.PENDING, claimed_by=None)
    )
    query = (
        select(NotifyDelivery)
        .where(
            NotifyDelivery.hook == hook,
            NotifyDelivery.state == DeliveryState.PENDING,
            NotifyDelivery.next_attempt_at <= now,
        )
        .order_by(NotifyDelivery.next_attempt_at, NotifyDelivery.id)
        .limit(1)
    )
    row = session.execute(locked(query, session, skip_locked=True)).scalar_one_or_none()
    if row is None:
        return None
    row.state = DeliveryState.SENDING
    row.claimed_by = claimer[:128]
    row.claimed_at = now
    event = row.event
    return ClaimedNotification(
        row.id, event.uid, event.kind, event.study_instance_uid, dict(event.details), event.at, row.attempts + 1
    )


def patient_values(session: Session, study_uid: str | None) -> dict[str, str | None]:
    """The study's Patient ID, Patient's Name and Accession Number (for hooks with
    ``include_phi``); empty when the study is gone."""
    if study_uid is None:
        return {}
    study = session.execute(select(Study).where(Study.study_instance_uid == study_uid)).scalar_one_or_none()
    if study is None:
        return {}
    return {
        "patient_id": study.patient_id,
        "patient_name": study.patient_name,
        "accession_number": study.accession_number,
    }


def record_attempt(
    session: Session,
    delivery_id: int,
    delivered: bool,
    status: int | None,
    message: str,
    max_attempts: int,
    retry_in_s: Callable[[int], float],
    now: datetime | None = None,
) -> str:
    """Record one attempt; returns the row's new state (delivered, pending or failed).
    ``retry_in_s``: the delay after a failed attempt, given the attempts made (the
    caller's backoff, ``outbox.backoff_seconds``; outbox itself queues events here)."""
    now = now or utcnow()
    row = session.get(NotifyDelivery, delivery_id)
    row.attempts += 1
    row.last_status = status
    row.claimed_by = None
    if delivered:
        row.state = DeliveryState.DELIVERED
        row.delivered_at = now
        row.last_error = None
    elif row.attempts >= max_attempts:
        row.state = DeliveryState.FAILED
        row.last_error = message[:1000]
        record_event(
            session,
            "ERROR",
            "notify-failed",
            f"{row.event.kind} to hook {row.hook}: {message} after {row.attempts} attempts; given up",
            row.event.study_instance_uid,
        )
    else:
        row.state = DeliveryState.PENDING
        row.last_error = message[:1000]
        row.next_attempt_at = now + timedelta(seconds=retry_in_s(row.attempts))
    return row.state


def prune(session: Session, keep_days: float = KEEP_DAYS, now: datetime | None = None) -> int:
    """Delete events dispatched more than ``keep_days`` ago whose deliveries are all
    finished (delivered or failed)."""
    cutoff = (now or utcnow()) - timedelta(days=keep_days)
    unfinished = select(NotifyDelivery.event_id).where(
        NotifyDelivery.state.in_([DeliveryState.PENDING, DeliveryState.SENDING])
    )
    old = select(NotifyEvent.id).where(NotifyEvent.dispatched_at < cutoff, NotifyEvent.id.not_in(unfinished))
    ids = list(session.execute(old.limit(1000)).scalars())
    if not ids:
        return 0
    session.execute(delete(NotifyDelivery).where(NotifyDelivery.event_id.in_(ids)))
    session.execute(delete(NotifyEvent).where(NotifyEvent.id.in_(ids)))
    return len(ids)

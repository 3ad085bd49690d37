"""The outbox: one row per (result object, destination), claimed by senders, retried with
backoff until delivered or out of attempts.

Rows move pending -> sending (claimed) -> delivered, or back to pending with a later
``next_attempt_at``, or to failed after ``max_attempts`` (``mammonode retry`` makes them
pending again). A row left ``sending`` by a sender that died goes back to pending after
``CLAIM_TIMEOUT_S``. What counts as delivered is the transport's call (see delivery/).
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from mammonode.db.models import Delivery, DeliveryState, ResultObject, Study, utcnow
from mammonode.db.records import record_event
from mammonode.db.session import locked

CLAIM_TIMEOUT_S = 600


@dataclass(frozen=True)
class NewResult:
    kind: str
    sop_class_uid: str
    sop_instance_uid: str
    path: str  # relative to the storage directory


@dataclass(frozen=True)
class Claimed:
    delivery_id: int
    destination: str
    path: str  # relative to the storage directory
    sop_class_uid: str
    study_instance_uid: str


@dataclass(frozen=True)
class Attempt:
    delivered: bool
    status: int | None  # the peer's status, None when it gave none
    message: str


def register_results(
    session: Session,
    study_id: int,
    job_id: int | None,
    selection_key: str,
    results: Iterable[NewResult],
    destinations: Iterable[str],
) -> list[ResultObject]:
    """Rows for result files already on disk, and a pending delivery per destination; a
    result or delivery that exists already is left as it is (re-sending is idempotent)."""
    destinations = list(destinations)
    rows = []
    for new in results:
        row = session.execute(
            select(ResultObject).where(ResultObject.sop_instance_uid == new.sop_instance_uid)
        ).scalar_one_or_none()
        if row is None:
            row = ResultObject(
                study_id=study_id,
                job_id=job_id,
                selection_key=selection_key,
                kind=new.kind,
                sop_class_uid=new.sop_class_uid,
                sop_instance_uid=new.sop_instance_uid,
                path=new.path,
            )
            session.add(row)
            session.flush()
        existing = {d.destination for d in row.deliveries}
        for name in destinations:
            if name not in existing:
                row.deliveries.append(Delivery(destination=name, state=DeliveryState.PENDING))
        rows.append(row)
    return rows


def backoff_seconds(attempts: int, initial: float, maximum: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with +-20 % jitter: initial, 2x, 4x, ... capped at ``maximum``."""
    rng = rng or random
    base = min(maximum, initial * (2 ** max(0, attempts - 1)))
    return base * rng.uniform(0.8, 1.2)


def claim_due(session: Session, claimer: str, limit: int = 64, now: datetime | None = None) -> list[Claimed]:
    """Take up to ``limit`` due rows for ``claimer`` (oldest due first)."""
    now = now or utcnow()
    session.execute(
        update(Delivery)
        .where(Delivery.state == DeliveryState.SENDING, Delivery.claimed_at < now - timedelta(seconds=CLAIM_TIMEOUT_S))
        .values(state=DeliveryState.PENDING, claimed_by=None)
    )
    query = (
        select(Delivery)
        .where(Delivery.state == DeliveryState.PENDING, Delivery.next_attempt_at <= now)
        .order_by(Delivery.next_attempt_at, Delivery.id)
        .limit(limit)
    )
    rows = list(session.execute(locked(query, session, skip_locked=True)).scalars())
    claimed = []
    for row in rows:
        row.state = DeliveryState.SENDING
        row.claimed_by = claimer
        row.claimed_at = now
        result = row.result
        claimed.append(
            Claimed(row.id, row.destination, result.path, result.sop_class_uid, result.study.study_instance_uid)
        )
    return claimed


def record_attempts(
    session: Session,
    destination: str,
    attempts: dict[int, Attempt],
    study_of: dict[int, str],
    max_attempts: int,
    backoff: tuple[float, float],
    now: datetime | None = None,
) -> None:
    """Record one attempt per delivery row: delivered, retried after backoff, or failed."""
    now = now or utcnow()
    for delivery_id, attempt in attempts.items():
        row = session.get(Delivery, delivery_id)
        row.attempts += 1
        row.last_status = attempt.status
        row.claimed_by = None
        if attempt.delivered:
            row.state = DeliveryState.DELIVERED
            row.delivered_at = now
            row.last_error = None if attempt.status == 0 else attempt.message
            continue
        row.last_error = attempt.message[:1000]
        if row.attempts >= max_attempts:
            row.state = DeliveryState.FAILED
            record_event(
                session,
                "ERROR",
                "delivery-failed",
                f"to {destination}: {attempt.message} after {row.attempts} attempts",
                study_of.get(delivery_id),
            )
        else:
            row.state = DeliveryState.PENDING
            row.next_attempt_at = now + timedelta(seconds=backoff_seconds(row.attempts, *backoff))
            record_event(
                session,
                "WARNING",
                "delivery-retry",
                f"to {destination}: {attempt.message}; will retry",
                study_of.get(delivery_id),
            )


def reset_for_retry(session: Session, study: Study, include_delivered: bool) -> int:
    """Failed (and, when asked, delivered) rows of a study back to pending now."""
    count = 0
    for delivery in session.execute(
        select(Delivery).join(ResultObject).where(ResultObject.study_id == study.id)
    ).scalars():
        if delivery.state == DeliveryState.FAILED or (include_delivered and delivery.state == DeliveryState.DELIVERED):
            delivery.state = DeliveryState.PENDING
            delivery.attempts = 0
            delivery.next_attempt_at = utcnow()
            count += 1
    return count


def waiting_count(session: Session, study: Study) -> int:
    """Deliveries of a study still pending or being sent."""
    return sum(
        1
        for result in study.results
        for d in result.deliveries
        if d.state in (DeliveryState.PENDING, DeliveryState.SENDING)
    )

"""The outbox: one row per (result object, destination), claimed by senders, retried with
backoff until delivered or out of attempts.

Rows move pending -> sending (claimed) -> delivered, or back to pending with a later
``next_attempt_at``, or to failed after ``max_attempts`` (``mammonode retry`` makes them
pending again). A row left ``sending`` by a sender that died goes back to pending: at the
next start on the same host when its process is gone (``release_dead_claims``, the claimer
names host and process), otherwise after ``CLAIM_TIMEOUT_S``. What counts as delivered is
the transport's call (see delivery/).

Results are versioned (reporting.uids.version_key): registering a study's new version
makes the rows of earlier versions that were not yet sent ``superseded`` (never sent), and
a forced retry re-sends only the current version.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from mammonode.db import notifications
from mammonode.db.models import CommitmentState, Delivery, DeliveryState, ResultObject, SendState, Study, utcnow
from mammonode.db.records import record_event
from mammonode.db.session import locked

CLAIM_TIMEOUT_S = 600


@dataclass(frozen=True)
class NewResult:
    kind: str
    sop_class_uid: str
    sop_instance_uid: str
    path: str  # relative to the storage directory
    destinations: tuple[str, ...] | None = None  # None: every destination given to register_results


@dataclass(frozen=True)
class EarlierResult:
    """A result object of an earlier version of a study, and where it went."""

    kind: str
    sop_class_uid: str
    sop_instance_uid: str
    path: str  # relative to the storage directory
    reached: frozenset[str]  # destinations that hold it (delivered once) or are being sent it


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
    version_key: str | None = None,
) -> list[ResultObject]:
    """Rows for result files already on disk, and a pending delivery per destination (the
    result's own list when it has one); a result or delivery that exists already is left as
    it is (re-sending is idempotent). With ``version_key`` the results are the study's
    current version: deliveries of other versions not yet sent are superseded, and this
    version's superseded deliveries (a version registered again) are pending again."""
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
                version_key=version_key,
            )
            session.add(row)
            session.flush()
        existing = {d.destination for d in row.deliveries}
        for name in destinations if new.destinations is None else new.destinations:
            if name not in existing:
                row.deliveries.append(Delivery(destination=name, state=DeliveryState.PENDING))
        if version_key is not None:
            for delivery in row.deliveries:
                if delivery.state == DeliveryState.SUPERSEDED:
                    delivery.state = DeliveryState.PENDING
                    delivery.next_attempt_at = utcnow()
        rows.append(row)
    if version_key is not None:
        _supersede(session, study_id, version_key)
    return rows


def _other_versions(study_id: int, version_key: str | None):
    """Result rows of a study that are not of ``version_key`` (rows without a version are
    older than versioning, so never current once a version exists)."""
    other = or_(ResultObject.version_key != version_key, ResultObject.version_key.is_(None))
    return (ResultObject.study_id == study_id, other)


def _supersede(session: Session, study_id: int, version_key: str) -> None:
    """Make ``version_key`` the study's current version; deliveries of other versions still
    waiting to be sent (pending or failed) are superseded instead."""
    study = session.get(Study, study_id)
    study.result_version = version_key
    unsent = Delivery.state.in_([DeliveryState.PENDING, DeliveryState.FAILED])
    waiting = session.execute(
        select(Delivery).join(ResultObject).where(*_other_versions(study_id, version_key), unsent)
    ).scalars()
    count = 0
    for delivery in waiting:
        delivery.state = DeliveryState.SUPERSEDED
        delivery.claimed_by = None
        count += 1
    if count:
        record_event(
            session,
            "INFO",
            "results-superseded",
            f"{count} deliveries of an earlier result version will not be sent",
            study.study_instance_uid,
        )


def earlier_results(session: Session, study_id: int, version_key: str) -> list[EarlierResult]:
    """The study's result objects of versions other than ``version_key``, newest first, and
    the destinations each reached; rejection notes are left out (they are never rejected)."""
    rows = session.execute(
        select(ResultObject)
        .where(*_other_versions(study_id, version_key), ResultObject.kind != "kos")
        .order_by(ResultObject.id.desc())
    ).scalars()
    out = []
    for row in rows:
        reached = frozenset(
            d.destination
            for d in row.deliveries
            if d.state in (DeliveryState.DELIVERED, DeliveryState.SENDING) or d.delivered_at is not None
        )
        out.append(EarlierResult(row.kind, row.sop_class_uid, row.sop_instance_uid, row.path, reached))
    return out


def backoff_seconds(attempts: int, initial: float, maximum: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with +-20 % jitter: initial, 2x, 4x, ... capped at ``maximum``."""
    rng = rng or random
    base = min(maximum, initial * (2 ** max(0, attempts - 1)))
    return base * rng.uniform(0.8, 1.2)


@dataclass(frozen=True)
class Claimer:
    """Who holds a claim: host, process and a per-process token, so that after a crash the
    next start on the same host can tell a dead claimer's rows from a live one's (the token
    tells an earlier process from this one when both had the same pid, as a container's
    pid 1 does)."""

    host: str
    pid: int
    token: str
    name: str

    def __str__(self) -> str:
        return f"{self.host}:{self.pid}:{self.token}:{self.name}"[:128]  # claimed_by is String(128)

    @classmethod
    def parse(cls, text: str | None) -> Claimer | None:
        """The claimer a ``claimed_by`` value names; None for another form (then only the
        claim timeout frees its rows)."""
        parts = (text or "").split(":", 3)
        if len(parts) != 4 or not parts[1].isdigit():
            return None
        return cls(parts[0], int(parts[1]), parts[2], parts[3])


def claim_due(
    session: Session,
    claimer: str,
    limit: int = 64,
    now: datetime | None = None,
    destinations: Collection[str] | None = None,
    excluding: Collection[str] = (),
) -> list[Claimed]:
    """Take up to ``limit`` due rows for ``claimer`` (oldest due first), only of
    ``destinations`` when given and never of ``excluding``: each destination has a sender of
    its own, so a destination that hangs holds up only its own rows."""
    now = now or utcnow()
    session.execute(
        update(Delivery)
        .where(Delivery.state == DeliveryState.SENDING, Delivery.claimed_at < now - timedelta(seconds=CLAIM_TIMEOUT_S))
        .values(state=DeliveryState.PENDING, claimed_by=None)
    )
    query = select(Delivery).where(Delivery.state == DeliveryState.PENDING, Delivery.next_attempt_at <= now)
    if destinations is not None:
        query = query.where(Delivery.destination.in_(list(destinations)))
    if excluding:
        query = query.where(Delivery.destination.not_in(list(excluding)))
    query = query.order_by(Delivery.next_attempt_at, Delivery.id).limit(limit)
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


def release_dead_claims(
    session: Session, host: str, alive: Callable[[Claimer], bool], model: type[SendState] = Delivery
) -> int:
    """Rows (of ``model``: result deliveries, or webhook deliveries) left ``sending`` by
    claimers on ``host`` that are no longer alive back to pending, due as they were (a failed
    attempt is not counted: the outcome is unknown, and the stable UIDs make a re-send
    replace). Other hosts' claims wait for the timeout: their processes cannot be asked."""
    sending = session.execute(
        select(model.claimed_by).where(model.state == DeliveryState.SENDING, model.claimed_by.is_not(None)).distinct()
    ).scalars()
    dead = []
    for text in sending:
        claimer = Claimer.parse(text)
        if claimer is not None and claimer.host == host and not alive(claimer):
            dead.append(text)
    if not dead:
        return 0
    result = session.execute(
        update(model)
        .where(model.state == DeliveryState.SENDING, model.claimed_by.in_(dead))
        .values(state=DeliveryState.PENDING, claimed_by=None)
    )
    return result.rowcount or 0


def record_attempts(
    session: Session,
    destination: str,
    attempts: dict[int, Attempt],
    study_of: dict[int, str],
    max_attempts: int,
    backoff: tuple[float, float],
    now: datetime | None = None,
) -> None:
    """Record one attempt per delivery row: delivered, retried after backoff, or failed
    (then one ``delivery.failed`` notification per study, naming the objects)."""
    now = now or utcnow()
    given_up: dict[str | None, list[tuple[Delivery, Attempt]]] = {}
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
            given_up.setdefault(study_of.get(delivery_id), []).append((row, attempt))
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
    for study_uid, failed in given_up.items():
        details = {
            "destination": destination,
            "objects": len(failed),
            "sop_instance_uids": [row.result.sop_instance_uid for row, _ in failed],
            "attempts": max(row.attempts for row, _ in failed),
            "error": "; ".join(sorted({attempt.message for _, attempt in failed}))[:2000],
        }
        notifications.queue(session, notifications.DELIVERY_FAILED, study_uid, details)


def reset_for_retry(session: Session, study: Study, include_delivered: bool) -> int:
    """Failed (and, when asked, delivered) rows of the study's current result version back
    to pending now, and delivered ones whose storage commitment timed out (sent and asked
    again); superseded versions are never sent again."""
    count = 0
    query = select(Delivery).join(ResultObject).where(ResultObject.study_id == study.id)
    if study.result_version is not None:
        query = query.where(ResultObject.version_key == study.result_version)
    for delivery in session.execute(query).scalars():
        timed_out = delivery.state == DeliveryState.DELIVERED and delivery.commitment == CommitmentState.TIMEOUT
        if (
            delivery.state == DeliveryState.FAILED
            or (include_delivered and delivery.state == DeliveryState.DELIVERED)
            or timed_out
        ):
            delivery.state = DeliveryState.PENDING
            delivery.commitment = None
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

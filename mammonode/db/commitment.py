"""Storage commitment of delivered results (DICOM PS3.4 Annex J, Push Model): the state of
each delivery's commitment and the rules that change it.

A delivery to a destination with ``storage_commitment`` is first ``delivered`` (C-STORE
success), then ``committing`` once the N-ACTION is accepted, and ``committed`` only when
the peer's N-EVENT-REPORT lists the object as committed. The Transaction UID is written
before the N-ACTION is sent, so a report on a new association (or after a restart) always
finds its rows. An object the report lists as failed is sent again with the usual backoff
and attempt cap (``outbox``), and asked for again after that send. No report within
``commitment_timeout_s``: ``commit-timeout``, left for the admin (``mammonode retry`` re-sends
and asks again); a report that arrives later still commits it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session

from mammonode.db import notifications
from mammonode.db.models import CommitmentState, Delivery, DeliveryState, utcnow
from mammonode.db.outbox import backoff_seconds
from mammonode.db.records import record_event

# PS3.4 J.3.3.1 / C.14.1.1: Failure Reason (0008,1197) values named in messages.
FAILURE_REASONS = {
    0x0110: "processing failure",
    0x0112: "no such object instance",
    0x0119: "class / instance conflict",
    0x0122: "referenced SOP class not supported",
    0x0131: "duplicate transaction UID",
    0x0213: "resource limitation",
}


@dataclass(frozen=True)
class Report:
    """One N-EVENT-REPORT of the Storage Commitment Push Model, as read from its Event
    Information: the transaction, the SOP Instance UIDs committed, and those that failed
    with their Failure Reason (None where the peer gave none)."""

    transaction_uid: str
    committed: frozenset[str] = frozenset()
    failed: Mapping[str, int | None] = field(default_factory=dict)


def report_from_dataset(ds: Dataset) -> Report:
    """The report an Event Information data set carries (Referenced SOP Sequence: committed;
    Failed SOP Sequence: failed). Raises ValueError without a Transaction UID."""
    uid = str(ds.get("TransactionUID", "") or "")
    if not uid:
        raise ValueError("no Transaction UID in the event information")
    committed = frozenset(str(item.ReferencedSOPInstanceUID) for item in ds.get("ReferencedSOPSequence", []))
    failed: dict[str, int | None] = {}
    for item in ds.get("FailedSOPSequence", []):
        reason = item.get("FailureReason")
        failed[str(item.ReferencedSOPInstanceUID)] = int(reason) if reason is not None else None
    return Report(uid, committed, failed)


def reason_text(reason: int | None) -> str:
    if reason is None:
        return "no reason given"
    return f"0x{reason:04X} {FAILURE_REASONS.get(reason, 'failure')}"


def prepare(
    session: Session, delivery_ids: Iterable[int], now: datetime | None = None
) -> tuple[str, list[tuple[str, str]]]:
    """A new Transaction UID on the delivered rows, marked ``committing``, committed before
    the N-ACTION is sent; returns it and the (SOP Class UID, SOP Instance UID) to reference."""
    now = now or utcnow()
    transaction_uid = generate_uid(prefix=None)  # 2.25.<UUID>, PS3.5 B.2
    references = []
    for delivery_id in delivery_ids:
        row = session.get(Delivery, delivery_id)
        if row is None or row.state != DeliveryState.DELIVERED:
            continue
        row.commitment = CommitmentState.REQUESTED
        row.commit_uid = transaction_uid
        row.commit_requested_at = now
        row.committed_at = None
        references.append((row.result.sop_class_uid, row.result.sop_instance_uid))
    return transaction_uid, references


def _study_uid(row: Delivery) -> str:
    return row.result.study.study_instance_uid


def request_failed(
    session: Session,
    transaction_uid: str,
    message: str,
    max_attempts: int,
    backoff: tuple[float, float],
    now: datetime | None = None,
) -> int:
    """The N-ACTION was not accepted (peer unreachable, context refused, failure status):
    the transaction's rows are sent again with backoff, as a failed delivery would be, and
    asked for again after that."""
    rows = session.execute(select(Delivery).where(Delivery.commit_uid == transaction_uid)).scalars()
    count = 0
    for row in rows:
        if row.commitment == CommitmentState.REQUESTED:
            _send_again(session, row, f"storage commitment request failed: {message}", max_attempts, backoff, now)
            count += 1
    return count


def _send_again(
    session: Session, row: Delivery, message: str, max_attempts: int, backoff: tuple[float, float], now: datetime | None
) -> None:
    """Back to the outbox: pending after backoff, or failed when its attempts are used up
    (the attempt was counted when the C-STORE was recorded)."""
    now = now or utcnow()
    row.commitment = None
    row.last_error = message[:1000]
    row.claimed_by = None
    if row.attempts >= max_attempts:
        row.state = DeliveryState.FAILED
        record_event(
            session,
            "ERROR",
            "delivery-failed",
            f"to {row.destination}: {message} after {row.attempts} attempts",
            _study_uid(row),
        )
        details = {
            "destination": row.destination,
            "objects": 1,
            "sop_instance_uids": [row.result.sop_instance_uid],
            "attempts": row.attempts,
            "error": message[:2000],
        }
        notifications.queue(session, notifications.DELIVERY_FAILED, _study_uid(row), details)
    else:
        row.state = DeliveryState.PENDING
        row.next_attempt_at = now + timedelta(seconds=backoff_seconds(max(1, row.attempts), *backoff))
        record_event(
            session, "WARNING", "delivery-retry", f"to {row.destination}: {message}; will retry", _study_uid(row)
        )


@dataclass(frozen=True)
class Applied:
    committed: int
    resent: int
    unknown: int  # references of the report this transaction never asked for


def apply_report(
    session: Session,
    report: Report,
    max_attempts: int,
    backoff: tuple[float, float],
    destinations: Iterable[str] | None = None,
    now: datetime | None = None,
) -> Applied | None:
    """Apply a peer's report to the rows of its transaction (only those of ``destinations``
    when given: the AE titles that may report for them). None when no row has the
    Transaction UID. A row already sent again under a newer transaction keeps its state."""
    now = now or utcnow()
    query = select(Delivery).where(Delivery.commit_uid == report.transaction_uid)
    if destinations is not None:
        query = query.where(Delivery.destination.in_(list(destinations)))
    rows = list(session.execute(query).scalars())
    if not rows:
        return None
    by_uid = {row.result.sop_instance_uid: row for row in rows}
    committed = resent = 0
    for uid, row in by_uid.items():
        if row.state != DeliveryState.DELIVERED:
            continue  # re-sent or purged since; its newer transaction decides
        if uid in report.committed and uid not in report.failed:
            row.commitment = CommitmentState.COMMITTED
            row.committed_at = now
            row.last_error = None
            committed += 1
        elif uid in report.failed:
            reason = reason_text(report.failed[uid])
            _send_again(session, row, f"storage commitment failed ({reason})", max_attempts, backoff, now)
            resent += 1
    unknown = len((report.committed | set(report.failed)) - set(by_uid))
    return Applied(committed, resent, unknown)


def expire(session: Session, destination: str, timeout_s: float, now: datetime | None = None) -> int:
    """Rows of ``destination`` asked for longer than ``timeout_s`` ago without a report:
    ``commit-timeout`` (one WARNING event per study). Not re-sent: the peer may hold the
    objects and only its report is missing; the admin decides (``mammonode retry``). Only
    rows still ``delivered``: one superseded or sent again since awaits no report."""
    now = now or utcnow()
    rows = list(
        session.execute(
            select(Delivery).where(
                Delivery.destination == destination,
                Delivery.state == DeliveryState.DELIVERED,
                Delivery.commitment == CommitmentState.REQUESTED,
                Delivery.commit_requested_at < now - timedelta(seconds=timeout_s),
            )
        ).scalars()
    )
    per_study: dict[str, int] = {}
    for row in rows:
        row.commitment = CommitmentState.TIMEOUT
        row.last_error = f"no storage commitment report within {timeout_s:g} s"
        per_study[_study_uid(row)] = per_study.get(_study_uid(row), 0) + 1
    for study_uid, count in per_study.items():
        record_event(
            session,
            "WARNING",
            "commit-timeout",
            f"to {destination}: {count} objects without a storage commitment report within {timeout_s:g} s",
            study_uid,
        )
    return len(rows)


def shown_state(row: Delivery) -> str:
    """What status views show: the commitment in place of ``delivered`` when one was asked."""
    if row.state == DeliveryState.DELIVERED and row.commitment:
        return row.commitment
    return row.state

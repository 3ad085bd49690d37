"""Reliable delivery of result objects: an outbox in the database, C-STORE out, retries.

Each (result object, destination) pair is one outbox row. A sender claims due rows, opens
one association per destination for the batch (negotiating exactly the SOP classes it
carries), and records each object's status. Success and the warning statuses
0xB000/0xB006/0xB007 count as delivered; anything else is retried with exponential backoff
and jitter until ``delivery.max_attempts``, after which the row is ``failed`` (visible in
``mammonode status``; ``mammonode retry`` sends it again). Result UIDs are stable, so a
re-send after a crash replaces the copy at the PACS rather than duplicating it.
"""

from __future__ import annotations

import logging
import random
import socket
import ssl
import threading
from datetime import datetime, timedelta
from pathlib import Path

import pydicom
from pynetdicom import AE
from pynetdicom.presentation import build_context
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from mammonode.config import Config, Destination
from mammonode.db.models import Delivery, DeliveryState, ResultObject, Study, utcnow
from mammonode.db.records import record_event
from mammonode.db.session import Database
from mammonode.metrics import METRICS

log = logging.getLogger("mammonode.delivery")

DELIVERED_STATUSES = {0x0000, 0xB000, 0xB006, 0xB007}
TRANSFER_SYNTAXES = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]
CLAIM_TIMEOUT_S = 600


def backoff_seconds(attempts: int, initial: float, maximum: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with +-20 % jitter: initial, 2x, 4x, ... capped at ``maximum``."""
    rng = rng or random
    base = min(maximum, initial * (2 ** max(0, attempts - 1)))
    return base * rng.uniform(0.8, 1.2)


def claim_due(session: Session, claimer: str, limit: int = 64, now: datetime | None = None) -> list[int]:
    now = now or utcnow()
    # Rows claimed by a sender that died go back to pending.
    session.execute(
        update(Delivery)
        .where(
            Delivery.state == DeliveryState.SENDING,
            Delivery.claimed_at < now - timedelta(seconds=CLAIM_TIMEOUT_S),
        )
        .values(state=DeliveryState.PENDING, claimed_by=None)
    )
    query = (
        select(Delivery)
        .where(Delivery.state == DeliveryState.PENDING, Delivery.next_attempt_at <= now)
        .order_by(Delivery.next_attempt_at, Delivery.id)
        .limit(limit)
    )
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    rows = list(session.execute(query).scalars())
    for row in rows:
        row.state = DeliveryState.SENDING
        row.claimed_by = claimer
        row.claimed_at = now
    return [row.id for row in rows]


def _client_ssl(dest: Destination) -> tuple[ssl.SSLContext, str] | None:
    if not dest.tls:
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    return context, dest.host


def send_batch(cfg: Config, dest: Destination, items: list[tuple[int, Path, str]]) -> dict[int, tuple[int | None, str]]:
    """C-STORE each (delivery id, file, SOP class) over one association.
    Returns delivery id -> (status or None, error text)."""
    ae = AE(ae_title=dest.calling_ae_title or cfg.node.ae_title)
    ae.acse_timeout = 30
    ae.dimse_timeout = 120
    ae.network_timeout = 60
    for sop_class in sorted({sop for _, _, sop in items}):
        ae.requested_contexts.append(build_context(sop_class, TRANSFER_SYNTAXES))
    outcome: dict[int, tuple[int | None, str]] = {}
    try:
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=_client_ssl(dest))
    except OSError as exc:
        return {i: (None, f"connect failed: {exc}") for i, _, _ in items}
    if not assoc.is_established:
        reason = "association rejected" if assoc.is_rejected else "association failed (no answer or aborted)"
        return {i: (None, reason) for i, _, _ in items}
    try:
        for delivery_id, path, _sop in items:
            if not assoc.is_established:
                outcome[delivery_id] = (None, "association lost")
                continue
            try:
                ds = pydicom.dcmread(path)
            except Exception as exc:
                outcome[delivery_id] = (None, f"cannot read result file: {exc}")
                continue
            try:
                status = assoc.send_c_store(ds)
            except Exception as exc:  # pynetdicom raises on context problems
                outcome[delivery_id] = (None, f"C-STORE error: {exc}")
                continue
            if status is None or "Status" not in status:
                outcome[delivery_id] = (None, "no response (timeout or abort)")
            else:
                code = int(status.Status)
                comment = str(status.get("ErrorComment", "")) if code not in DELIVERED_STATUSES else ""
                outcome[delivery_id] = (code, comment or f"status 0x{code:04X}")
    finally:
        if assoc.is_established:
            assoc.release()
    return outcome


def _stow_outcome(body: bytes, sop_uid: str) -> tuple[int | None, str]:
    """Read a STOW-RS response (DICOM JSON) for one instance."""
    import json

    from pydicom.dataset import Dataset

    try:
        ds = Dataset.from_json(json.loads(body or b"{}"))
    except Exception:
        return None, "unreadable STOW-RS response"
    for item in ds.get("ReferencedSOPSequence", []):
        if str(item.get("ReferencedSOPInstanceUID", "")) == sop_uid:
            warning = item.get("WarningReason")
            return (int(warning) if warning else 0x0000), ""
    for item in ds.get("FailedSOPSequence", []):
        if str(item.get("ReferencedSOPInstanceUID", "")) == sop_uid:
            reason = int(item.get("FailureReason", 0xC000))
            return reason, f"STOW-RS failure reason 0x{reason:04X}"
    return None, "instance missing from the STOW-RS response"


def send_stow(dest: Destination, items: list[tuple[int, Path, str]]) -> dict[int, tuple[int | None, str]]:
    """POST each object to <url>/studies as multipart/related; type="application/dicom"."""
    import urllib.error
    import urllib.request
    import uuid

    outcome: dict[int, tuple[int | None, str]] = {}
    url = dest.url.rstrip("/") + "/studies"
    for delivery_id, path, _sop in items:
        try:
            payload = path.read_bytes()
            sop_uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        except Exception as exc:
            outcome[delivery_id] = (None, f"cannot read result file: {exc}")
            continue
        boundary = uuid.uuid4().hex
        body = (
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            + payload
            + f"\r\n--{boundary}--\r\n".encode()
        )
        headers = {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
        }
        if dest.token:
            headers["Authorization"] = f"Bearer {dest.token}"
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                outcome[delivery_id] = _stow_outcome(response.read(), sop_uid)
        except urllib.error.HTTPError as exc:
            if exc.code in (202, 409):
                outcome[delivery_id] = _stow_outcome(exc.read(), sop_uid)
            else:
                outcome[delivery_id] = (None, f"HTTP {exc.code} from {url}")
        except (OSError, urllib.error.URLError) as exc:
            outcome[delivery_id] = (None, f"connect failed: {exc}")
    return outcome


class DeliverySender:
    def __init__(self, cfg: Config, db: Database, name: str = "sender"):
        self.cfg = cfg
        self.db = db
        self.name = f"{socket.gethostname()}:{name}"
        self._stop = threading.Event()

    def run_once(self) -> int:
        destinations = {d.name: d for d in self.cfg.destinations}
        with self.db.session() as session:
            claimed = claim_due(session, self.name)
            rows = (
                list(
                    session.execute(
                        select(Delivery, ResultObject, Study)
                        .join(ResultObject, Delivery.result_id == ResultObject.id)
                        .join(Study, ResultObject.study_id == Study.id)
                        .where(Delivery.id.in_(claimed))
                    ).all()
                )
                if claimed
                else []
            )
            batches: dict[str, list] = {}
            study_of = {}
            for delivery, result, study in rows:
                batches.setdefault(delivery.destination, []).append(
                    (delivery.id, self.cfg.storage_dir / result.path, result.sop_class_uid)
                )
                study_of[delivery.id] = study.study_instance_uid
        for name, items in batches.items():
            dest = destinations.get(name)
            if dest is None:
                outcome = {i: (None, f"destination {name!r} is no longer configured") for i, _, _ in items}
            elif dest.kind == "dicomweb":
                outcome = send_stow(dest, items)
            else:
                outcome = send_batch(self.cfg, dest, items)
            self._record(name, outcome, study_of)
        return len(claimed)

    def _record(self, destination: str, outcome: dict[int, tuple[int | None, str]], study_of: dict[int, str]) -> None:
        d = self.cfg.delivery
        now = utcnow()
        with self.db.session() as session:
            for delivery_id, (status, message) in outcome.items():
                METRICS.deliveries.labels(destination, "delivered" if status in DELIVERED_STATUSES else "error").inc()
                row = session.get(Delivery, delivery_id)
                row.attempts += 1
                row.last_status = status
                row.claimed_by = None
                if status in DELIVERED_STATUSES:
                    row.state = DeliveryState.DELIVERED
                    row.delivered_at = now
                    row.last_error = None if status == 0 else message
                    continue
                row.last_error = message[:1000]
                if row.attempts >= d.max_attempts:
                    row.state = DeliveryState.FAILED
                    record_event(
                        session,
                        "ERROR",
                        "delivery-failed",
                        f"to {destination}: {message} after {row.attempts} attempts",
                        study_of.get(delivery_id),
                    )
                else:
                    row.state = DeliveryState.PENDING
                    row.next_attempt_at = now + timedelta(
                        seconds=backoff_seconds(row.attempts, d.backoff_initial_s, d.backoff_max_s)
                    )
                    record_event(
                        session,
                        "WARNING",
                        "delivery-retry",
                        f"to {destination}: {message}; will retry",
                        study_of.get(delivery_id),
                    )
        delivered = sum(1 for s, _ in outcome.values() if s in DELIVERED_STATUSES)
        log.info("delivery to %s: %d of %d objects delivered", destination, delivered, len(outcome))

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                busy = self.run_once()
            except Exception as exc:
                log.error("delivery loop error: %s", exc)
                busy = 0
            if not busy:
                self._stop.wait(self.cfg.delivery.poll_interval_s)

    def stop(self) -> None:
        self._stop.set()

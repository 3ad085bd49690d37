"""Storage commitment reports arriving at the listener: an SCP that answers our N-ACTION on
a new association is its requester and plays the Push Model's SCP role (role selection),
sending an N-EVENT-REPORT. Only the AE titles of destinations with ``storage_commitment``
may report, and only for their own deliveries; the report is matched by Transaction UID in
the database, so one that comes after a restart, or after the timeout, still counts."""

from __future__ import annotations

import logging

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES
from pynetdicom.sop_class import StorageCommitmentPushModel

from mammonode.config import Config
from mammonode.db import commitment
from mammonode.db.session import Database

log = logging.getLogger(__name__)

# N-EVENT-REPORT response statuses (PS3.7 C.4.1.1.3 / 10.1.1.1.8).
SUCCESS = 0x0000
PROCESSING_FAILURE = 0x0110
NO_SUCH_EVENT_TYPE = 0x0113
INVALID_ARGUMENT = 0x0115
REQUEST_EVENT_TYPES = (1, 2)  # 1: all committed; 2: failures exist (PS3.4 J.3.3)


def add_context(ae: AE) -> None:
    """Accept the Push Model with either role, so a peer reporting on a new association (as
    requester in the SCP role) is accepted."""
    ae.add_supported_context(StorageCommitmentPushModel, ALL_TRANSFER_SYNTAXES, scu_role=True, scp_role=True)


def reporting_destinations(cfg: Config, calling_ae: str) -> list[str]:
    """The destinations with storage commitment whose AE title is ``calling_ae``."""
    calling = calling_ae.strip()
    return [d.name for d in cfg.destinations if d.storage_commitment and d.ae_title.strip() == calling]


def handle_event_report(cfg: Config, db: Database, event) -> tuple[int, None]:
    """Apply one N-EVENT-REPORT; the status to answer (and no Event Reply)."""
    calling = event.assoc.requestor.ae_title.strip()
    names = reporting_destinations(cfg, calling)
    if not names:
        log.warning("storage commitment report from %s refused: no destination with that AE title", calling)
        return PROCESSING_FAILURE, None
    event_type = int(event.request.EventTypeID)
    if event_type not in REQUEST_EVENT_TYPES:
        return NO_SUCH_EVENT_TYPE, None
    try:
        report = commitment.report_from_dataset(event.event_information)
    except Exception as exc:  # an undecodable data set or a missing Transaction UID
        log.warning("storage commitment report from %s refused: %s", calling, exc)
        return INVALID_ARGUMENT, None
    d = cfg.delivery
    with db.session() as session:
        applied = commitment.apply_report(
            session, report, d.max_attempts, (d.backoff_initial_s, d.backoff_max_s), destinations=names
        )
    if applied is None:
        # Nothing of ours (purged, or another node's): acknowledged, so the peer stops retrying.
        log.warning("storage commitment report from %s: unknown transaction %s", calling, report.transaction_uid)
        return SUCCESS, None
    log.info(
        "storage commitment report from %s, transaction %s: %d committed, %d to send again%s",
        calling,
        report.transaction_uid,
        applied.committed,
        applied.resent,
        f", {applied.unknown} references not in the transaction" if applied.unknown else "",
    )
    return SUCCESS, None

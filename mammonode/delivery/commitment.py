"""Storage commitment requests (PS3.4 J.3.2): one N-ACTION per delivered batch, on an
association of its own, then a short wait for the N-EVENT-REPORT in case the peer answers
on that association; most peers (Orthanc, most PACS) answer later on a new association to
our listener (ingest/dimse.py), which the database matches by Transaction UID."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import StorageCommitmentPushModel

from mammonode.config import Destination
from mammonode.delivery.dimse import TRANSFER_SYNTAXES, _client_ssl, _connect_error

# The well-known SOP Instance of the Push Model (PS3.4 J.3.5), and Action Type ID 1:
# "Request Storage Commitment".
PUSH_MODEL_INSTANCE = "1.2.840.10008.1.20.1.1"
REQUEST_ACTION = 1
SAME_ASSOCIATION_WAIT_S = 2.0


@dataclass(frozen=True)
class Requested:
    """What came of one N-ACTION: accepted or not (and why), and the Event Information of
    an N-EVENT-REPORT for this transaction received on the same association, if any."""

    accepted: bool
    message: str
    report: Dataset | None = None
    event_type: int | None = None


def action_information(transaction_uid: str, references: list[tuple[str, str]]) -> Dataset:
    """The N-ACTION's Action Information: the Transaction UID and one Referenced SOP
    Sequence item per (SOP Class UID, SOP Instance UID)."""
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    items = []
    for sop_class, sop_instance in references:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        items.append(item)
    ds.ReferencedSOPSequence = items
    return ds


def request_commitment(
    dest: Destination,
    transaction_uid: str,
    references: list[tuple[str, str]],
    calling_ae_title: str,
    timeout_s: float = 60.0,
    wait_s: float = SAME_ASSOCIATION_WAIT_S,
) -> Requested:
    """Ask ``dest`` to commit ``references`` under ``transaction_uid``; wait ``wait_s`` for a
    report on the same association before releasing it."""
    received: list[tuple[Dataset, int]] = []
    arrived = threading.Event()

    def on_report(event) -> tuple[int, None]:
        info = event.event_information
        if str(info.get("TransactionUID", "")) == transaction_uid:
            received.append((info, int(event.request.EventTypeID)))
            arrived.set()
        return 0x0000, None

    ae = AE(ae_title=dest.calling_ae_title or calling_ae_title)
    ae.acse_timeout = min(30.0, timeout_s)
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    ae.add_requested_context(StorageCommitmentPushModel, TRANSFER_SYNTAXES)
    try:
        assoc = ae.associate(
            dest.host,
            dest.port,
            ae_title=dest.ae_title,
            tls_args=_client_ssl(dest),
            evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)],
        )
    except OSError as exc:
        return Requested(False, f"connect failed: {exc}")
    if not assoc.is_established:
        if assoc.is_rejected:
            return Requested(False, "association rejected")
        return Requested(False, _connect_error(dest) or "association failed (no answer or aborted)")
    try:
        refused = _send_action(assoc, transaction_uid, references, timeout_s)
        if refused is None:
            arrived.wait(wait_s)
    finally:
        if assoc.is_established:
            assoc.release()
    if refused is not None:
        return refused
    # Checked after the release: a report handled (and answered with success) between the
    # end of the wait and the release must count too, the peer will not send it again.
    if received:
        info, event_type = received[0]
        return Requested(True, "report on the same association", info, event_type)
    return Requested(True, "requested")


def _send_action(
    assoc: Association, transaction_uid: str, references: list[tuple[str, str]], timeout_s: float
) -> Requested | None:
    """Send the N-ACTION on an established association; None when the peer accepted it,
    otherwise why not."""
    if not assoc.accepted_contexts:
        return Requested(False, "the peer does not support Storage Commitment Push Model")
    try:
        status, _reply = assoc.send_n_action(
            action_information(transaction_uid, references),
            REQUEST_ACTION,
            StorageCommitmentPushModel,
            PUSH_MODEL_INSTANCE,
        )
    except Exception as exc:  # pynetdicom raises on context problems
        return Requested(False, f"N-ACTION error: {exc}")
    if status is None or "Status" not in status:
        return Requested(False, f"no N-ACTION response within {timeout_s:g} s")
    code = int(status.Status)
    if code != 0x0000:
        comment = str(status.get("ErrorComment", "") or "")
        return Requested(False, f"N-ACTION status 0x{code:04X}" + (f" {comment}" if comment else ""))
    return None

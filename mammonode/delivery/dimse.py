"""Results out over DIMSE: one association per destination and batch, C-STORE each object."""

from __future__ import annotations

import socket
import ssl

import pydicom
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE
from pynetdicom.presentation import build_context

from mammonode.config import Destination
from mammonode.delivery.status import DELIVERED_STATUSES, Item, Outcome

TRANSFER_SYNTAXES = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]


def _client_ssl(dest: Destination) -> tuple[ssl.SSLContext, str] | None:
    if not dest.tls:
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    return context, dest.host


def _connect_error(dest: Destination) -> str | None:
    """The operating system's reason when the peer cannot be reached at all (pynetdicom only
    logs it): asked again with a plain TCP connect, on the failure path only."""
    try:
        with socket.create_connection((dest.host, dest.port), timeout=10):
            return None
    except OSError as exc:
        return f"connect failed: {exc.strerror or exc}"


def _transfer_syntax(path) -> str | None:
    try:
        return str(read_file_meta_info(path).TransferSyntaxUID)
    except Exception:  # an unreadable file is reported when it is sent
        return None


def _requested_contexts(items: list[Item]) -> list:
    """Per SOP class, the uncompressed syntaxes; and per compressed file syntax a context of
    its own, so a peer that takes it gets the file as stored and one that does not gets it
    decompressed."""
    contexts = {(sop, tuple(TRANSFER_SYNTAXES)) for _, _, sop in items}
    for _, path, sop in items:
        syntax = _transfer_syntax(path)
        if syntax and syntax not in TRANSFER_SYNTAXES:
            contexts.add((sop, (syntax,)))
    return [build_context(sop, list(syntaxes)) for sop, syntaxes in sorted(contexts)]


def _as_accepted(ds, accepted: set[tuple[str, str]]):
    """The data set in a transfer syntax the peer accepted for its SOP class."""
    sop = str(ds.SOPClassUID)
    if (sop, str(ds.file_meta.TransferSyntaxUID)) in accepted:
        return ds
    if any((sop, syntax) in accepted for syntax in TRANSFER_SYNTAXES) and ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress(generate_instance_uid=False)  # the same instance, in another transfer syntax
    return ds


def send_dimse(dest: Destination, items: list[Item], calling_ae_title: str, timeout_s: float = 60.0) -> Outcome:
    """C-STORE each (delivery id, file, SOP class) over one association, negotiating exactly
    the SOP classes (and compressed syntaxes) it carries. ``calling_ae_title`` unless the
    destination names its own. A peer silent for ``timeout_s`` (no C-STORE response, no
    data at all) gets the association aborted; that object and the rest of the batch fail
    this attempt and are retried with backoff."""
    ae = AE(ae_title=dest.calling_ae_title or calling_ae_title)
    ae.acse_timeout = min(30.0, timeout_s)
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    ae.requested_contexts = _requested_contexts(items)
    outcome: dict[int, tuple[int | None, str]] = {}
    try:
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=_client_ssl(dest))
    except OSError as exc:
        return {i: (None, f"connect failed: {exc}") for i, _, _ in items}
    if not assoc.is_established:
        if assoc.is_rejected:
            reason = "association rejected"
        else:
            reason = _connect_error(dest) or "association failed (no answer or aborted)"
        return {i: (None, reason) for i, _, _ in items}
    accepted = {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
    try:
        for delivery_id, path, _sop in items:
            if not assoc.is_established:
                outcome[delivery_id] = (None, "association lost")
                continue
            try:
                ds = _as_accepted(pydicom.dcmread(path), accepted)
            except Exception as exc:
                outcome[delivery_id] = (None, f"cannot read or decode result file: {exc}")
                continue
            try:
                status = assoc.send_c_store(ds)
            except Exception as exc:  # pynetdicom raises on context problems
                outcome[delivery_id] = (None, f"C-STORE error: {exc}")
                continue
            if status is None or "Status" not in status:
                outcome[delivery_id] = (None, f"no response within {timeout_s:g} s (timeout or abort)")
            else:
                code = int(status.Status)
                comment = str(status.get("ErrorComment", "")) if code not in DELIVERED_STATUSES else ""
                outcome[delivery_id] = (code, comment or f"status 0x{code:04X}")
    finally:
        if assoc.is_established:
            assoc.release()
    return outcome

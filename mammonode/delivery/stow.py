"""Results out over STOW-RS: each object POSTed to ``<url>/studies`` as multipart/related."""

from __future__ import annotations

import pydicom

from mammonode.config import Destination
from mammonode.delivery.http import OPENER
from mammonode.delivery.status import Item, Outcome


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


def send_stow(dest: Destination, items: list[Item], timeout_s: float = 60.0) -> Outcome:
    """POST each object to <url>/studies as multipart/related; type="application/dicom".
    ``timeout_s`` bounds the connect and each socket read, so a service that never answers
    fails the attempt instead of holding the sender."""
    import urllib.error
    import urllib.request
    import uuid

    outcome: dict[int, tuple[int | None, str]] = {}
    url = dest.url.rstrip("/") + "/studies"
    silent = False  # the service let a request time out: the rest of the batch waits for a retry
    for delivery_id, path, _sop in items:
        if silent:
            outcome[delivery_id] = (None, f"not sent: {url} did not answer an earlier object")
            continue
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
            with OPENER.open(request, timeout=timeout_s) as response:
                outcome[delivery_id] = _stow_outcome(response.read(), sop_uid)
        except urllib.error.HTTPError as exc:
            if exc.code in (202, 409):
                outcome[delivery_id] = _stow_outcome(exc.read(), sop_uid)
            elif 300 <= exc.code < 400:
                outcome[delivery_id] = (None, f"HTTP {exc.code} redirect from {url} not followed (set the final URL)")
            else:
                outcome[delivery_id] = (None, f"HTTP {exc.code} from {url}")
        except (OSError, urllib.error.URLError) as exc:
            if isinstance(exc, TimeoutError) or isinstance(getattr(exc, "reason", None), TimeoutError):
                silent = True
                outcome[delivery_id] = (None, f"no response within {timeout_s:g} s from {url}")
            else:
                outcome[delivery_id] = (None, f"connect failed: {exc}")
    return outcome

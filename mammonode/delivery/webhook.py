"""Notifications out: one JSON body POSTed to a [[notify]] hook, optionally signed.

Signature (when the hook has a ``secret``): the request carries
``X-Mammonode-Timestamp: <Unix time, whole seconds>`` and
``X-Mammonode-Signature: sha256=<hex>``, the hex being HMAC-SHA256 (RFC 2104) keyed with the
secret's UTF-8 bytes over ``<timestamp>.`` followed by the raw request body. Signing the
timestamp lets a receiver refuse a replayed request (one older than a few minutes).
"""

from __future__ import annotations

import hashlib
import hmac
import urllib.error
import urllib.request

from mammonode.delivery.http import OPENER

SIGNATURE_HEADER = "X-Mammonode-Signature"
TIMESTAMP_HEADER = "X-Mammonode-Timestamp"


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The ``X-Mammonode-Signature`` value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode("utf-8"), f"{timestamp}.".encode("ascii") + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def post_json(
    url: str, body: bytes, headers: dict[str, str], timeout_s: float, secret: str = "", timestamp: int = 0
) -> tuple[int | None, str]:
    """POST ``body`` (JSON); returns (HTTP status or None, "" when the hook took it (2xx),
    else why not). ``timeout_s`` bounds the connect and each read."""
    headers = {"Content-Type": "application/json", **headers}
    if secret:
        headers[TIMESTAMP_HEADER] = str(timestamp)
        headers[SIGNATURE_HEADER] = signature(secret, timestamp, body)
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with OPENER.open(request, timeout=timeout_s) as response:
            response.read(65536)
            status = response.status
    except urllib.error.HTTPError as exc:
        if 300 <= exc.code < 400:
            return exc.code, f"HTTP {exc.code} redirect (not followed)"
        return exc.code, f"HTTP {exc.code} {exc.reason}"
    except urllib.error.URLError as exc:
        return None, f"unreachable: {exc.reason}"
    except (OSError, ValueError) as exc:  # timeouts, resets, a malformed response
        return None, f"{type(exc).__name__}: {exc}"
    if 200 <= status < 300:
        return status, ""
    return status, f"HTTP {status}"

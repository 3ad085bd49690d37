"""What every transport reports: per outbox row, the peer's status (or None) and a message."""

from __future__ import annotations

from pathlib import Path

# Success, and the warnings that still mean stored: the storage warnings of PS3.4 B.2.3
# (coercion of data elements, elements discarded, data set does not match SOP class) and the
# general DIMSE warnings of PS3.7 C (0x0001, attribute list error, attribute value out of
# range). A warning is never re-sent: the peer holds the object.
DELIVERED_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007, 0x0001, 0x0107, 0x0116})

Item = tuple[int, Path, str]  # (outbox row id, file, SOP Class UID)
Outcome = dict[int, tuple[int | None, str]]  # row id -> (status or None, message)


def is_delivered(status: int | None) -> bool:
    return status in DELIVERED_STATUSES

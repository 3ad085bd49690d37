"""What every transport reports: per outbox row, the peer's status (or None) and a message."""

from __future__ import annotations

from pathlib import Path

# Success, and the storage warnings that still mean stored (PS3.4 B.2.3): coercion of data
# elements, elements discarded, data set does not match SOP class.
DELIVERED_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})

Item = tuple[int, Path, str]  # (outbox row id, file, SOP Class UID)
Outcome = dict[int, tuple[int | None, str]]  # row id -> (status or None, message)


def is_delivered(status: int | None) -> bool:
    return status in DELIVERED_STATUSES

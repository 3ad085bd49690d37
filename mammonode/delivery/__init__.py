"""Transports that carry result objects to a destination (DIMSE C-STORE, STOW-RS).

Each has one shape, ``send(destination, items) -> Outcome``, and knows nothing of the
database: the sender loop (service/) claims outbox rows, calls :func:`send`, and records
what came back.
"""

from __future__ import annotations

from mammonode.config import Destination
from mammonode.delivery.status import Item, Outcome


def send(dest: Destination, items: list[Item], calling_ae_title: str) -> Outcome:
    if dest.kind == "dicomweb":
        from mammonode.delivery.stow import send_stow

        return send_stow(dest, items)
    from mammonode.delivery.dimse import send_dimse

    return send_dimse(dest, items, calling_ae_title)

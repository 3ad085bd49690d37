"""Transports that carry result objects to a destination (DIMSE C-STORE, STOW-RS).

Each has one shape, ``send(destination, items) -> Outcome``, and knows nothing of the
database: the sender loop (service/) claims outbox rows, calls :func:`send`, and records
what came back. ``webhook.py`` POSTs [[notify]] events (service/notifier.py), one body each.
"""

from __future__ import annotations

from mammonode.config import Destination
from mammonode.delivery.status import Item, Outcome


def send(dest: Destination, items: list[Item], calling_ae_title: str, timeout_s: float = 60.0) -> Outcome:
    """Send ``items`` to ``dest``. ``timeout_s`` bounds each wait for the peer (association,
    each C-STORE response, each STOW-RS read), so a peer that accepts and never answers
    costs one failed attempt, never a stuck sender."""
    if dest.kind == "dicomweb":
        from mammonode.delivery.stow import send_stow

        return send_stow(dest, items, timeout_s)
    from mammonode.delivery.dimse import send_dimse

    return send_dimse(dest, items, calling_ae_title, timeout_s)

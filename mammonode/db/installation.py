"""This installation's identity as result equipment, made once and kept in the database.

The database is the one place every worker of a node (and every node sharing a PostgreSQL
database, which are one installation) reads it from; it survives restarts and upgrades.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy.exc import IntegrityError

from mammonode.db.models import Installation
from mammonode.db.session import Database


def installation_identity(db: Database, generate: Callable[[], tuple[str, str]]) -> tuple[str, str]:
    """(device UID, serial number): the kept one, or a new one from ``generate`` stored now.
    Two workers racing on first use both end with the one that was committed first."""
    with db.session() as session:
        row = session.get(Installation, 1)
        if row is not None:
            return row.device_uid, row.serial_number
    device_uid, serial_number = generate()
    try:
        with db.session() as session:
            session.add(Installation(id=1, device_uid=device_uid, serial_number=serial_number))
    except IntegrityError:
        pass
    with db.session() as session:
        row = session.get(Installation, 1)
        return row.device_uid, row.serial_number

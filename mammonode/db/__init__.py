"""The node's database: models, migrations, and the operations on them."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mammonode.config import Config
    from mammonode.db.session import Database


def open_database(cfg: Config, migrate: bool = True) -> Database:
    """The configured database, its schema brought to the current revision."""
    from mammonode.db.migrate import upgrade
    from mammonode.db.session import Database

    cfg.storage_dir.mkdir(parents=True, exist_ok=True)
    db = Database(cfg.database_url)
    if migrate:
        upgrade(db.engine)
    return db

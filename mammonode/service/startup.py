"""What stops a node or worker from starting, said in one line (no torch imported here, so
the admin commands can use it too)."""

from __future__ import annotations

from mammonode.config import Config
from mammonode.db import open_database


class StartupError(RuntimeError):
    """The node cannot start; the message is one line for the operator."""


def open_node_database(cfg: Config):
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    try:
        return open_database(cfg)
    except OSError as exc:
        raise StartupError(f"storage directory {cfg.storage_dir}: {exc.strerror or exc}") from None
    except SQLAlchemyError as exc:
        where = make_url(cfg.database_url).render_as_string(hide_password=True)
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise StartupError(f"database {where}: {reason}") from None

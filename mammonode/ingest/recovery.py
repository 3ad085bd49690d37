"""Start-up recovery of the storage directory after a crash or an unclean stop."""

from __future__ import annotations

import os
import time
from pathlib import Path

from mammonode.db.records import known_paths
from mammonode.db.session import Database
from mammonode.ingest.layout import StorageLayout


def recover(storage_dir: Path, db: Database, min_age_s: float = 0.0) -> dict[str, int]:
    """At start-up: remove temporary files and instance files no row refers to (a crash
    between rename and commit; the sender got no success and will send again).

    When several listeners share the storage directory (PostgreSQL scale-out) another one
    may be between rename and commit right now, so only files older than ``min_age_s``
    are touched."""
    layout = StorageLayout(storage_dir)
    removed_tmp = removed_orphans = 0
    limit = time.time() - min_age_s

    def old(path: Path) -> bool:
        try:
            return path.stat().st_mtime <= limit
        except FileNotFoundError:
            return False

    if layout.tmp_dir.is_dir():
        for item in layout.tmp_dir.iterdir():
            if item.is_file() and old(item):
                item.unlink(missing_ok=True)
                removed_tmp += 1
    instances = layout.instances_dir
    if instances.is_dir():
        with db.session() as session:
            known = known_paths(session)
        for root, _dirs, files in os.walk(instances):
            for name in files:
                rel = layout.relative(Path(root) / name)
                if rel not in known and old(Path(root) / name):
                    (Path(root) / name).unlink(missing_ok=True)
                    removed_orphans += 1
    return {"temporary_files": removed_tmp, "orphan_files": removed_orphans}

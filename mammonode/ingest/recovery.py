"""Start-up recovery of the storage directory, and rebuilding instance rows from the files.

The received file is the truth: its header holds everything its row needs. So a file that
no row refers to (a crash between rename and commit, or a database restored from a backup
or lost) is never deleted: start-up recovery moves it to ``quarantine/`` and
:func:`reindex` (``mammonode db reindex``) records it again through the same
:func:`~mammonode.ingest.store.ingest` as a C-STORE. Only temporary files of unfinished
writes are removed.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from pydicom.dataset import Dataset

from mammonode.config import Rule
from mammonode.db.records import instance_path, instance_paths, known_paths
from mammonode.db.session import Database
from mammonode.ingest.layout import StorageLayout, files_below, move
from mammonode.ingest.rules import Match, match
from mammonode.ingest.store import StoreError, ingest, read_header

log = logging.getLogger(__name__)

# How a re-recorded file is counted by reindex().
RECORDED, RESTORED, UNCHANGED, SUPERSEDED, REFUSED, RECENT = (
    "recorded",
    "restored",
    "unchanged",
    "superseded",
    "refused",
    "recent",
)


def _older_than(limit: float) -> Callable[[Path], bool]:
    def old(path: Path) -> bool:
        try:
            return path.stat().st_mtime <= limit
        except FileNotFoundError:
            return False

    return old


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def recover(storage_dir: Path, db: Database, min_age_s: float = 0.0) -> dict[str, int]:
    """At start-up: remove temporary files of unfinished writes and move instance files no
    row refers to into quarantine (logged as a WARNING, counted in ``status``).

    When several listeners share the storage directory (PostgreSQL scale-out) another one
    may be between rename and commit right now, so only files older than ``min_age_s``
    are touched. Returns what was removed (temporary files only)."""
    layout = StorageLayout(storage_dir)
    old = _older_than(time.time() - min_age_s)
    removed_tmp = 0
    for item in files_below(layout.tmp_dir):
        if old(item):
            item.unlink(missing_ok=True)
            removed_tmp += 1
    moved = quarantine_unreferenced(layout, db, old)
    total = layout.quarantined_count()
    if total:
        log.warning(
            "start-up recovery: %d instance files no database row refers to moved to %s now, %d there in all; "
            "kept, not deleted: `mammonode db reindex` records them again",
            moved,
            layout.quarantine_dir,
            total,
        )
    return {"temporary_files": removed_tmp}


def quarantine_unreferenced(layout: StorageLayout, db: Database, old: Callable[[Path], bool]) -> int:
    """Move every file under ``instances/`` that no row refers to (and ``old`` accepts) to
    ``quarantine/``, so that nothing under ``instances/`` is unreferenced."""
    with db.session() as session:
        known = known_paths(session)
    moved = 0
    for path in files_below(layout.instances_dir):
        if layout.relative(path) not in known and old(path):
            move(path, layout.quarantine_path(path))
            moved += 1
    return moved


def reindex(storage_dir: Path, db: Database, min_age_s: float = 60.0, rules: Sequence[Rule] = ()) -> dict[str, int]:
    """Record again every instance file under ``instances/`` and ``quarantine/`` that no row
    refers to, from its header, through the same checks and row as a C-STORE; a quarantined
    file that is recorded moves back under ``instances/``. Idempotent; safe while the node
    runs (files under ``instances/`` younger than ``min_age_s`` may be mid-store and are
    left alone). ``rules`` (the configured [[rules]]) decide again which files are held, as
    for STOW-RS (no calling AE title); a file a ``drop`` rule now matches is recorded held:
    reindex never discards a kept file. Returns counts per outcome."""
    layout = StorageLayout(storage_dir)
    router = _reindex_router(rules) if rules else None
    with db.session() as session:
        known = known_paths(session)
        rows = instance_paths(session)
    counts = Counter({k: 0 for k in (RECORDED, RESTORED, UNCHANGED, SUPERSEDED, REFUSED, RECENT)})
    old = _older_than(time.time() - min_age_s)
    candidates = []
    for path in files_below(layout.instances_dir):
        if layout.relative(path) in known:
            counts[UNCHANGED] += 1
        elif not old(path):
            counts[RECENT] += 1
        else:
            candidates.append(path)
    candidates += list(files_below(layout.quarantine_dir))
    # Oldest first: when two files hold versions of one instance, the newest is recorded last.
    for path in sorted(candidates, key=_mtime):
        counts[_reindex_file(layout, db, path, router)] += 1
    out = dict(counts)
    out["quarantined_files"] = layout.quarantined_count()
    out["rows_without_file"] = sum(1 for rel in rows if not layout.absolute(rel).exists())
    return out


def _newer_version_recorded(layout: StorageLayout, db: Database, path: Path) -> bool:
    """Whether the instance is recorded with other content (another file name: names carry
    the content's hash) whose file is at least as new."""
    sop_uid = str(read_header(path).get("SOPInstanceUID", "")).rstrip("\x00 ")
    with db.session() as session:
        relative = instance_path(session, sop_uid)
    if relative is None:
        return False
    recorded = layout.absolute(relative)
    return recorded.name != path.name and recorded.exists() and _mtime(recorded) >= _mtime(path)


def _reindex_router(rules: Sequence[Rule]) -> Callable[[Dataset], Match]:
    def route(ds: Dataset) -> Match:
        found = match(rules, ds, calling_ae=None)
        if found.action == "drop":  # already kept: held, never run, never deleted
            return replace(found, rule=replace(found.rule, action="store"))
        return found

    return route


def _reindex_file(layout: StorageLayout, db: Database, path: Path, router=None) -> str:
    quarantined = layout.is_quarantined(path)
    try:
        if not path.exists():
            return SUPERSEDED  # moved aside while an earlier file of the list was recorded
        if _newer_version_recorded(layout, db, path):
            _keep_aside(layout, path)
            return SUPERSEDED
        result = ingest(path, layout.root, db, calling_ae="REINDEX", keep_replaced=True, router=router)
    except StoreError as exc:
        _keep_aside(layout, path)
        log.warning("reindex: %s not recorded: 0x%04X %s", layout.relative(path), exc.status, exc.comment)
        return REFUSED
    if result.path != path:
        path.unlink()  # the same bytes now live under instances/ (named by their sha256)
    return RESTORED if quarantined else RECORDED


def _keep_aside(layout: StorageLayout, path: Path) -> None:
    """A file that cannot be recorded stays (or goes) in quarantine, never deleted."""
    if path.exists() and not layout.is_quarantined(path):
        move(path, layout.quarantine_path(path))

"""The storage directory's layout, and the one way a file is written durably into it.

::

    <storage>/instances/<study UID>/<SOP UID>.<sha256[:16]>.dcm   received objects
    <storage>/results/<study UID>/<kind>.<SOP UID>.dcm            produced objects
    <storage>/tmp/                                               unfinished writes only
    <storage>/quarantine/instances/<study UID>/<file>            kept, no row refers to it

Every name below ``instances/`` and ``results/`` is built from checked UIDs, never from an
unchecked header value. A write is: temporary file, fsync, rename, fsync of the directory;
after a crash a file is either whole under its final name or a leftover in ``tmp/``. A
received file is never deleted for want of a row: it moves to ``quarantine/`` under the same
relative path, and ``mammonode db reindex`` re-records it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the layout alone (``mammonode status``) need not load pydicom
    from pydicom.dataset import Dataset


class StorageLayout:
    def __init__(self, root: Path):
        self.root = Path(root)

    @property
    def tmp_dir(self) -> Path:
        return self.root / "tmp"

    @property
    def instances_dir(self) -> Path:
        return self.root / "instances"

    @property
    def quarantine_dir(self) -> Path:
        return self.root / "quarantine"

    def temporary_file(self) -> Path:
        return self.tmp_dir / f"{uuid.uuid4().hex}.part"

    def instance_path(self, study_uid: str, sop_uid: str, sha256: str) -> Path:
        return self.instances_dir / study_uid / f"{sop_uid}.{sha256[:16]}.dcm"

    def result_path(self, study_uid: str, kind: str, sop_uid: str) -> Path:
        return self.root / "results" / study_uid / f"{kind}.{sop_uid}.dcm"

    def study_dirs(self, study_uid: str) -> list[Path]:
        """Everything the node keeps for one study (for purge)."""
        return [self.instances_dir / study_uid, self.root / "results" / study_uid]

    def relative(self, path: Path) -> str:
        """The form stored in the database."""
        return str(path.relative_to(self.root))

    def absolute(self, relative: str) -> Path:
        return self.root / relative

    def quarantine_path(self, path: Path) -> Path:
        """Where a file of the storage directory goes when no row refers to it: the same
        relative path below ``quarantine/``, so it can always be put back."""
        return self.quarantine_dir / path.relative_to(self.root)

    def is_quarantined(self, path: Path) -> bool:
        return path.is_relative_to(self.quarantine_dir)

    def quarantined_count(self) -> int:
        return sum(1 for _ in files_below(self.quarantine_dir))


def files_below(folder: Path) -> Iterator[Path]:
    """Every regular file below ``folder`` (none when it does not exist)."""
    for root, _dirs, names in os.walk(folder):
        for name in names:
            path = Path(root) / name
            if path.is_file():
                yield path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_dir(path: Path) -> None:
    """Create ``path`` (and parents), fsyncing each new directory entry."""
    if path.is_dir():
        return
    ensure_dir(path.parent)
    try:
        path.mkdir()
    except FileExistsError:
        return
    fsync_dir(path.parent)


def publish(temp: Path, final: Path) -> None:
    """Give a fully written, fsynced temporary file its final name, durably."""
    ensure_dir(final.parent)
    os.replace(temp, final)
    fsync_dir(final.parent)


def move(source: Path, target: Path) -> None:
    """Rename a file to another place in the same storage directory, durably (both
    directory entries fsynced), replacing a file of the same name."""
    ensure_dir(target.parent)
    os.replace(source, target)
    fsync_dir(target.parent)
    fsync_dir(source.parent)


def write_dataset(ds: Dataset, final: Path, layout: StorageLayout) -> None:
    """Write a data set as a DICOM file under ``final``, durably."""
    ensure_dir(layout.tmp_dir)
    temp = layout.temporary_file()
    try:
        ds.save_as(temp, enforce_file_format=True)
        with open(temp, "rb+") as fh:
            os.fsync(fh.fileno())
        publish(temp, final)
    finally:
        temp.unlink(missing_ok=True)

"""The storage directory's layout, and the one way a file is written durably into it.

::

    <storage>/instances/<study UID>/<SOP UID>.<sha256[:16]>.dcm   received objects
    <storage>/results/<study UID>/<kind>.<SOP UID>.dcm            produced objects
    <storage>/tmp/                                               unfinished writes only

Every name below ``instances/`` and ``results/`` is built from checked UIDs, never from an
unchecked header value. A write is: temporary file, fsync, rename, fsync of the directory;
after a crash a file is either whole under its final name or a leftover in ``tmp/``.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

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

"""What the node holds, as DICOMweb sees it: received instances and produced results, with
the header attributes that QIDO-RS matches and returns."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session

from mammonode.db.models import Instance, ResultObject, Study
from mammonode.db.session import Database

STUDY_KEYS = (
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyID",
    "StudyDescription",
    "ReferringPhysicianName",
)
SERIES_KEYS = ("SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription", "Laterality")
INSTANCE_KEYS = (
    "SOPClassUID",
    "SOPInstanceUID",
    "InstanceNumber",
    "Rows",
    "Columns",
    "ImageLaterality",
    "ViewPosition",
)


@dataclass(frozen=True)
class Entry:
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class: str
    modality: str
    path: Path


class HeaderCache:
    """Parsed headers (pixel data left on disk), least recently used first out, bounded in
    bytes: a header's size is what parsing it read from the file, so a peer's object with a
    100 MB private element costs its bytes, not one slot of a count. Headers larger than
    ``max_entry_bytes`` are parsed for each request and never kept."""

    def __init__(self, max_bytes: int = 64 << 20, max_entry_bytes: int = 4 << 20):
        self.max_bytes, self.max_entry_bytes = max_bytes, max_entry_bytes
        self._entries: OrderedDict[tuple[str, int], tuple[Dataset, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0

    def get(self, path: Path) -> Dataset:
        key = (str(path), os.stat(path).st_mtime_ns)
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None:
                self._entries.move_to_end(key)
                return hit[0]
        with open(path, "rb") as f:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            size = f.tell()
        if size <= self.max_entry_bytes:
            with self._lock:
                if key not in self._entries:
                    self._entries[key] = (ds, size)
                    self.bytes += size
                while self.bytes > self.max_bytes:
                    _, (_, evicted) = self._entries.popitem(last=False)
                    self.bytes -= evicted
        return ds

    def __len__(self) -> int:
        return len(self._entries)


HEADERS = HeaderCache()


def header(path: Path) -> Dataset:
    return HEADERS.get(path)


def entries(session: Session, storage_dir: Path, study_uid: str | None = None) -> list[Entry]:
    """Every stored object (received and produced), optionally of one study."""
    query = select(Instance, Study.study_instance_uid).join(Study, Instance.study_id == Study.id)
    results = select(ResultObject, Study.study_instance_uid).join(Study, ResultObject.study_id == Study.id)
    if study_uid is not None:
        query = query.where(Study.study_instance_uid == study_uid)
        results = results.where(Study.study_instance_uid == study_uid)
    out = []
    for inst, uid in session.execute(query):
        out.append(
            Entry(
                uid,
                inst.series_instance_uid or "",
                inst.sop_instance_uid,
                inst.sop_class_uid,
                inst.modality or "",
                storage_dir / inst.path,
            )
        )
    for res, uid in session.execute(results):
        path = storage_dir / res.path
        if not path.exists():
            continue
        ds = header(path)
        out.append(
            Entry(
                uid,
                str(ds.SeriesInstanceUID),
                res.sop_instance_uid,
                res.sop_class_uid,
                str(ds.get("Modality", "")),
                path,
            )
        )
    return out


#: Bounds on a QIDO-RS match value (checked by the handler; 400 beyond them).
MAX_MATCH_CHARS = 4096
MAX_WILDCARDS = 16


def _wildcard(value: str, pattern: str) -> bool:
    """PS3.4 C.2.2.2.4 wildcard matching: ``*`` any run, ``?`` one character, every other
    character literal (no ``[...]`` classes). Backtracks at most to the last ``*``, so it
    takes O(len(value) * len(pattern)) whatever the pattern."""
    v = p = 0
    star, mark = -1, 0
    while v < len(value):
        if p < len(pattern) and pattern[p] == "*":
            star, mark = p, v
            p += 1
        elif p < len(pattern) and (pattern[p] == "?" or pattern[p] == value[v]):
            v += 1
            p += 1
        elif star >= 0:
            mark += 1
            v, p = mark, star + 1
        else:
            return False
    while p < len(pattern) and pattern[p] == "*":
        p += 1
    return p == len(pattern)


def _match_text(value: str, pattern: str) -> bool:
    if "*" in pattern or "?" in pattern:
        return _wildcard(value, pattern)
    return value == pattern


def _match_date(value: str, pattern: str) -> bool:
    if "-" in pattern:
        low, high = pattern.split("-", 1)
        return (not low or value >= low) and (not high or value <= high)
    return value == pattern


def matches(ds: Dataset, keyword: str, pattern: str, modalities: set[str] | None = None) -> bool:
    """QIDO-RS attribute matching (PS3.18 8.3.4): UID lists, wildcards, date ranges."""
    if keyword == "ModalitiesInStudy":
        wanted = {m for m in pattern.split(",") if m}
        return bool(wanted & (modalities or set()))
    value = str(ds.get(keyword, "") or "")
    if keyword.endswith("UID"):
        return value in {v for v in pattern.split(",") if v}
    if keyword.endswith("Date"):
        return _match_date(value, pattern)
    return _match_text(value, pattern)


def pick(ds: Dataset, keywords: tuple[str, ...]) -> Dataset:
    out = Dataset()
    for keyword in keywords:
        if keyword in ds:
            out[keyword] = ds[keyword]
    return out


class Catalog:
    """The stored objects of a node, grouped by study, for the QIDO-RS and WADO-RS handlers."""

    def __init__(self, storage_dir: Path, db: Database, base_url: str = ""):
        self.storage_dir = storage_dir
        self.db = db
        self.base_url = base_url

    def _grouped(self, study_uid: str | None):
        with self.db.session() as session:
            found = entries(session, self.storage_dir, study_uid)
        studies: dict[str, list[Entry]] = defaultdict(list)
        for entry in found:
            studies[entry.study_uid].append(entry)
        return studies

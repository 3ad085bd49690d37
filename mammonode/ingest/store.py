"""Durable instance storage: the one path by which a received object enters the node.

Both listeners (DIMSE C-STORE and DICOMweb STOW-RS) hand a spooled DICOM file to
:func:`ingest`. It checks the header (nothing on disk is named from an unchecked value),
copies the file into the storage directory under a temporary name while hashing it,
fsyncs it, renames it to its final name, fsyncs the directory, and records it in the
database in one transaction. Only then may the caller acknowledge success. Any failure
raises :class:`StoreError` with the DICOM status to answer and leaves no file or row behind.

An object whose SOP Instance UID is already recorded in another study is refused; one whose
Patient ID is not its study's is kept but quarantined (never pipeline input). Neither ever
changes what an earlier, acknowledged object of the first study holds.

Routing rules (``[[rules]]``, ``rules.py``) decide each object's fate once its UIDs are checked:
``process`` records it as pipeline input (as before rules existed), ``store`` records it held
(kept, never pipeline input), ``drop`` acknowledges it without keeping file or row (logged
with its SOP Instance UID and the rule, counted in ``mammonode_instances_routed``).

A Deflated Explicit VR Little Endian object is inflated first, in chunks and with a cap
(``inflate.py``), and stored as Explicit VR Little Endian: pydicom would inflate it whole in
memory, here and wherever the stored file is read again.
"""

from __future__ import annotations

import errno
import gc
import hashlib
import logging
import os
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from time import sleep

import pydicom
from pydicom.dataset import Dataset
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from mammonode.db.records import InstanceConflict, InstanceMeta, Recorded, RecordOutcome, record_instance
from mammonode.db.session import Database
from mammonode.exam.assignment import ViewAssignment, assign_view
from mammonode.ingest.inflate import DEFAULT_MAX_INFLATED_BYTES, InflateRefused, inflate_to, read_file_meta
from mammonode.ingest.layout import StorageLayout, ensure_dir, move, publish
from mammonode.ingest.rules import Match
from mammonode.metrics import METRICS

log = logging.getLogger(__name__)

# Storage statuses (PS3.4 Annex B.2.3).
OUT_OF_RESOURCES = 0xA700
OUT_OF_RESOURCES_DB = 0xA701
DOES_NOT_MATCH_SOP_CLASS = 0xA900
INSTANCE_UID_MISMATCH = 0xA901
PIXEL_DATA_MISMATCH = 0xA902
CANNOT_UNDERSTAND = 0xC000
INVALID_UID = 0xC001
# A deflated data set inflating beyond storage.max_inflated_bytes: "cannot understand" (a
# Cxxx failure, never A7xx, which would have the sender retry an object that cannot fit).
INFLATED_TOO_LARGE = 0xC002
# PS3.7 Annex C (general statuses, valid in any DIMSE response): 0111H "Duplicate SOP
# Instance" - a failure whose meaning is exactly this case (the UID is already registered
# for another object). None of the Storage Service's own codes (PS3.4 B.2.3: A7xx out of
# resources, A9xx does not match SOP Class, Cxxx cannot understand) says so, and A7xx would
# make a sender retry an object that can never be stored.
DUPLICATE_SOP_INSTANCE = 0x0111

# SQLite primary result codes after which pooled connections may be stale: one opened
# while the file was read-only stays read-only, so they are closed and the write tried again
# on new ones (storing resumes without a restart once the file is writable).
_SQLITE_READONLY, _SQLITE_IOERR, _SQLITE_CANTOPEN = 8, 10, 14
STALE_ATTEMPTS = 3

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
MAX_UID_LENGTH = 64


class StoreError(Exception):
    def __init__(self, status: int, comment: str):
        super().__init__(comment)
        self.status = status
        self.comment = comment[:64]  # ErrorComment is LO (64 characters)


# The outcome of an object a `drop` rule discarded (acknowledged, neither file nor row kept).
DROPPED = "dropped"

# Chooses the routing rule of a received data set (the listener binds the calling AE title).
Router = Callable[[Dataset], Match]


@dataclass(frozen=True)
class IngestResult:
    outcome: str  # a RecordOutcome, or DROPPED
    study_instance_uid: str
    sop_instance_uid: str
    path: Path | None  # None when dropped
    series_instance_uid: str = ""
    rule: str | None = None  # the routing rule's name (None without rules)
    patient_id: str = ""  # for the audit trail only; never logged


def valid_uid(value: object) -> bool:
    """The DICOM UID grammar: dot-separated digit components, at most 64 characters.

    Components with a leading zero are formally invalid but sent by real devices; they are
    accepted, since a UID with digits and dots alone can never escape a directory.
    """
    return isinstance(value, str) and 0 < len(value) <= MAX_UID_LENGTH and bool(_UID.match(value))


def _uid(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None or str(value) == "":
        raise StoreError(DOES_NOT_MATCH_SOP_CLASS, f"missing {keyword}")
    value = str(value).rstrip("\x00 ")
    if not valid_uid(value):
        raise StoreError(INVALID_UID, f"invalid {keyword}")
    return value


def read_header(path: Path) -> Dataset:
    """The data set without loading bulk values (pixel data stays on disk)."""
    try:
        ds = pydicom.dcmread(path, defer_size=4096, force=False)
        # Touch every top-level element so that a malformed header fails here, not later.
        for _ in ds.iterall():
            pass
        return ds
    except StoreError:
        raise
    except RecursionError as exc:
        raise StoreError(CANNOT_UNDERSTAND, "data set nested too deeply") from exc
    except Exception as exc:  # pydicom raises many types for malformed input
        raise StoreError(CANNOT_UNDERSTAND, f"cannot parse data set: {type(exc).__name__}") from exc


def _check_pixel_data(ds: Dataset) -> None:
    """Native pixel data must hold exactly what Rows x Columns x ... declare."""
    if "PixelData" not in ds:
        if "Rows" in ds and "Columns" in ds and str(ds.get("Modality", "")).upper() in ("MG", "CT", "MR", "CR", "DX"):
            raise StoreError(DOES_NOT_MATCH_SOP_CLASS, "image without pixel data")
        return
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    element = ds.get_item("PixelData")
    length = element.length if hasattr(element, "length") else len(ds.PixelData)
    if ts is not None and pydicom.uid.UID(ts).is_encapsulated:
        if length != 0xFFFFFFFF and length < 8:
            raise StoreError(PIXEL_DATA_MISMATCH, "encapsulated pixel data is empty")
        return
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits = int(ds.BitsAllocated)
        samples = int(ds.get("SamplesPerPixel", 1))
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError) as exc:
        raise StoreError(DOES_NOT_MATCH_SOP_CLASS, "pixel data without valid image attributes") from exc
    if rows <= 0 or cols <= 0 or bits not in (1, 8, 16, 32, 64) or samples not in (1, 3) or frames <= 0:
        raise StoreError(DOES_NOT_MATCH_SOP_CLASS, "invalid image pixel attributes")
    expected_bits = rows * cols * samples * frames * bits
    expected = (expected_bits + 7) // 8
    if length not in (expected, expected + 1):
        raise StoreError(PIXEL_DATA_MISMATCH, f"pixel data {length} bytes, expected {expected}")


def _copy_hashed(source: Path, target: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(source, "rb") as src, open(target, "xb") as dst:
        while chunk := src.read(1 << 20):
            digest.update(chunk)
            dst.write(chunk)
            size += len(chunk)
        dst.flush()
        os.fsync(dst.fileno())
    return digest.hexdigest(), size


def _text(ds: Dataset, keyword: str, limit: int = 256) -> str | None:
    value = ds.get(keyword)
    if value is None:
        return None
    text = str(value).strip()
    return text[:limit] if text else None


def _acquired(ds: Dataset) -> str | None:
    for dt, date, time in (
        ("AcquisitionDateTime", None, None),
        (None, "AcquisitionDate", "AcquisitionTime"),
        (None, "ContentDate", "ContentTime"),
    ):
        if dt and ds.get(dt):
            return str(ds.get(dt))[:26]
        if date and ds.get(date):
            return (str(ds.get(date)) + str(ds.get(time, "") or ""))[:26]
    return None


def _discard(path: Path) -> None:
    """Remove a file of ours if possible; on a read-only or failing disk it stays for
    start-up recovery, and the caller's own error is the one to report."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def _storage_error(exc: OSError, sop_uid: str) -> StoreError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        reason = "disk full"
    elif exc.errno == errno.EROFS:
        reason = "storage read-only"
    else:
        reason = f"write error ({errno.errorcode.get(exc.errno, exc.errno)})"
    log.error("storage write failed for instance %s: %s", sop_uid, reason)
    return StoreError(OUT_OF_RESOURCES, f"{reason}, not stored")


def _stale_connection(exc: OperationalError) -> bool:
    code = getattr(exc.orig, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (_SQLITE_READONLY, _SQLITE_IOERR, _SQLITE_CANTOPEN)


def _drop_connections(db: Database) -> None:
    """Close every pooled connection, those of pools dropped earlier included (held in
    reference cycles until collected): SQLite shares one WAL index per process, read-only
    while any connection opened read-only lives."""
    db.dispose()
    gc.collect()


def _record(db: Database, meta: InstanceMeta) -> Recorded:
    """One transaction; when SQLite reports the database read-only or unreadable, tried
    again on new connections (see ``_SQLITE_READONLY``), a few times within a second."""
    for attempt in range(1, STALE_ATTEMPTS):
        try:
            with db.session() as session:
                return record_instance(session, meta)
        except OperationalError as exc:
            if not _stale_connection(exc):
                raise
        _drop_connections(db)
        sleep(0.1 * attempt)
    with db.session() as session:
        return record_instance(session, meta)


def _record_or_refuse(db: Database, meta: InstanceMeta, final: Path, created: bool) -> Recorded:
    """Record the instance; on any refusal remove the file this call published."""
    try:
        return _record(db, meta)
    except InstanceConflict as exc:
        if created:
            _discard(final)
            _remove_empty(final.parent)
        log.warning(
            "instance %s refused for study %s: already recorded in study %s",
            meta.sop_instance_uid,
            meta.study_instance_uid,
            exc.study_instance_uid,
        )
        raise StoreError(DUPLICATE_SOP_INSTANCE, "SOP Instance UID already stored in another study") from exc
    except SQLAlchemyError as exc:
        if created:
            _discard(final)
        log.error("database write failed for instance %s: %s", meta.sop_instance_uid, type(exc).__name__)
        raise StoreError(OUT_OF_RESOURCES_DB, "database unavailable, not stored") from exc


def _remove_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def _meta(
    ds: Dataset,
    uids: dict[str, str],
    assignment: ViewAssignment,
    path: str,
    size: int,
    digest: str,
    calling_ae: str | None,
    routed: Match | None,
) -> InstanceMeta:
    return InstanceMeta(
        sop_instance_uid=uids["SOPInstanceUID"],
        sop_class_uid=uids["SOPClassUID"],
        study_instance_uid=uids["StudyInstanceUID"],
        series_instance_uid=uids["SeriesInstanceUID"],
        modality=_text(ds, "Modality", 16),
        transfer_syntax_uid=str(ds.file_meta.get("TransferSyntaxUID", "")) or None,
        path=path,
        size=size,
        sha256=digest,
        view=assignment.view,
        usable=assignment.usable,
        reason=assignment.reason or None,
        mirrored=assignment.mirrored,
        acquired=_acquired(ds),
        calling_ae_title=calling_ae,
        patient_id=_text(ds, "PatientID", 64),
        patient_name=_text(ds, "PatientName", 324),
        accession_number=_text(ds, "AccessionNumber", 16),
        study_date=_text(ds, "StudyDate", 8),
        rule=routed.rule.name if routed else None,
        held=routed is not None and routed.action == "store",
    )


def _checked_uids(ds: Dataset, expected_sop_uid: str | None, expected_sop_class: str | None) -> dict[str, str]:
    uids = {k: _uid(ds, k) for k in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID")}
    if expected_sop_uid is not None and expected_sop_uid != uids["SOPInstanceUID"]:
        raise StoreError(INSTANCE_UID_MISMATCH, "SOP Instance UID differs from the request")
    if expected_sop_class is not None and expected_sop_class != uids["SOPClassUID"]:
        raise StoreError(DOES_NOT_MATCH_SOP_CLASS, "SOP Class UID differs from the request")
    return uids


def _set_aside(layout: StorageLayout, relative: str, keep: bool) -> None:
    """The file of an object a different one replaced: removed, or kept in quarantine when
    it is not certain to be the older one (``db reindex``)."""
    old = layout.absolute(relative)
    if not keep:
        _discard(old)
    elif old.exists():
        move(old, layout.quarantine_path(old))


def inflated_copy(path: Path, work_dir: Path, max_inflated_bytes: int) -> Path | None:
    """A deflated file's Explicit VR Little Endian equivalent, written in ``work_dir`` (the
    caller removes it); None when ``path`` is not deflated. StoreError when it inflates
    beyond ``max_inflated_bytes`` (nothing is written then) or is not valid deflate data."""
    meta = read_file_meta(path)
    if meta is None or not meta.deflated:
        return None  # nothing created: refusals of other objects stay what they were
    target = work_dir / f"{uuid.uuid4().hex}.inflated"
    try:
        ensure_dir(work_dir)
        return target if inflate_to(path, target, max_inflated_bytes) else None
    except InflateRefused as exc:
        if exc.too_large:
            comment = f"inflates beyond {max_inflated_bytes} bytes (storage.max_inflated_bytes)"
            raise StoreError(INFLATED_TOO_LARGE, comment) from exc
        raise StoreError(CANNOT_UNDERSTAND, str(exc)) from exc
    except OSError as exc:
        target.unlink(missing_ok=True)
        raise _storage_error(exc, "(deflated)") from exc


def ingest(
    spool: Path,
    storage_dir: Path,
    db: Database,
    calling_ae: str | None = None,
    expected_sop_uid: str | None = None,
    expected_sop_class: str | None = None,
    keep_replaced: bool = False,
    max_inflated_bytes: int = DEFAULT_MAX_INFLATED_BYTES,
    router: Router | None = None,
) -> IngestResult:
    """Check, store durably and record one received file (see the module docstring). A
    deflated data set is stored inflated, as Explicit VR Little Endian (pydicom would inflate
    it whole in memory wherever it is read), and refused beyond ``max_inflated_bytes``.
    ``router`` picks the routing rule (None: every object is processed, as for reindex)."""
    inflated = inflated_copy(spool, StorageLayout(storage_dir).tmp_dir, max_inflated_bytes)
    try:
        return _ingest(
            inflated or spool, storage_dir, db, calling_ae, expected_sop_uid, expected_sop_class, keep_replaced, router
        )
    finally:
        if inflated is not None:
            _discard(inflated)


def _ingest(
    spool: Path,
    storage_dir: Path,
    db: Database,
    calling_ae: str | None,
    expected_sop_uid: str | None,
    expected_sop_class: str | None,
    keep_replaced: bool,
    router: Router | None,
) -> IngestResult:
    ds = read_header(spool)
    uids = _checked_uids(ds, expected_sop_uid, expected_sop_class)
    sop_uid, study_uid = uids["SOPInstanceUID"], uids["StudyInstanceUID"]
    routed = router(ds) if router is not None else None
    if routed is not None and routed.action == "drop":
        # Nothing was written yet; the caller's spool file is the caller's to remove.
        METRICS.routed.labels(routed.rule.name, routed.action).inc()
        log.info("instance %s of study %s dropped by rule %r", sop_uid, study_uid, routed.rule.name)
        return IngestResult(DROPPED, study_uid, sop_uid, None, uids["SeriesInstanceUID"], routed.rule.name)
    _check_pixel_data(ds)
    assignment = assign_view(ds)

    layout = StorageLayout(storage_dir)
    temp = layout.temporary_file()
    try:
        ensure_dir(layout.tmp_dir)
        digest, size = _copy_hashed(spool, temp)
        final = layout.instance_path(study_uid, sop_uid, digest)
        meta = _meta(ds, uids, assignment, layout.relative(final), size, digest, calling_ae, routed)
        created = not final.exists()
        if created:
            publish(temp, final)
        else:
            temp.unlink()
        recorded = _record_or_refuse(db, meta, final, created)
    except OSError as exc:
        _discard(temp)
        raise _storage_error(exc, sop_uid) from exc
    if recorded.replaced_path and recorded.replaced_path != meta.path:
        _set_aside(layout, recorded.replaced_path, keep_replaced)
    if recorded.transition:
        log.info("study %s: %s", study_uid, recorded.transition)
    if recorded.outcome == RecordOutcome.REPLACED:
        log.warning("instance %s of study %s replaced by a different object", sop_uid, study_uid)
    if recorded.other_patient:
        log.error("instance %s of study %s: Patient ID differs from the study's; quarantined", sop_uid, study_uid)
    if routed is not None:
        METRICS.routed.labels(routed.rule.name, routed.action).inc()
    return IngestResult(
        outcome=recorded.outcome,
        study_instance_uid=study_uid,
        sop_instance_uid=sop_uid,
        path=final,
        series_instance_uid=uids["SeriesInstanceUID"],
        rule=routed.rule.name if routed else None,
        patient_id=meta.patient_id or "",
    )

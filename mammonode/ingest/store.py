"""Durable instance storage: the one path by which a received object enters the node.

Both listeners (DIMSE C-STORE and DICOMweb STOW-RS) hand a spooled DICOM file to
:func:`ingest`. It checks the header (nothing on disk is named from an unchecked value),
copies the file into the storage directory under a temporary name while hashing it,
fsyncs it, renames it to its final name, fsyncs the directory, and records it in the
database in one transaction. Only then may the caller acknowledge success. Any failure
raises :class:`StoreError` with the DICOM status to answer and leaves no file or row behind.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from sqlalchemy.exc import SQLAlchemyError

from mammonode.db.records import InstanceMeta, RecordOutcome, record_instance
from mammonode.db.session import Database
from mammonode.exam.assignment import assign_view
from mammonode.ingest.layout import StorageLayout, ensure_dir, publish

log = logging.getLogger(__name__)

# Storage statuses (PS3.4 Annex B.2.3).
OUT_OF_RESOURCES = 0xA700
OUT_OF_RESOURCES_DB = 0xA701
DOES_NOT_MATCH_SOP_CLASS = 0xA900
INSTANCE_UID_MISMATCH = 0xA901
PIXEL_DATA_MISMATCH = 0xA902
CANNOT_UNDERSTAND = 0xC000
INVALID_UID = 0xC001

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
MAX_UID_LENGTH = 64


class StoreError(Exception):
    def __init__(self, status: int, comment: str):
        super().__init__(comment)
        self.status = status
        self.comment = comment[:64]  # ErrorComment is LO (64 characters)


@dataclass(frozen=True)
class IngestResult:
    outcome: RecordOutcome
    study_instance_uid: str
    sop_instance_uid: str
    path: Path


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


def ingest(
    spool: Path,
    storage_dir: Path,
    db: Database,
    calling_ae: str | None = None,
    expected_sop_uid: str | None = None,
    expected_sop_class: str | None = None,
) -> IngestResult:
    ds = read_header(spool)
    sop_uid = _uid(ds, "SOPInstanceUID")
    study_uid = _uid(ds, "StudyInstanceUID")
    series_uid = _uid(ds, "SeriesInstanceUID")
    sop_class = _uid(ds, "SOPClassUID")
    if expected_sop_uid is not None and expected_sop_uid != sop_uid:
        raise StoreError(INSTANCE_UID_MISMATCH, "SOP Instance UID differs from the request")
    if expected_sop_class is not None and expected_sop_class != sop_class:
        raise StoreError(DOES_NOT_MATCH_SOP_CLASS, "SOP Class UID differs from the request")
    _check_pixel_data(ds)
    assignment = assign_view(ds)

    layout = StorageLayout(storage_dir)
    temp = layout.temporary_file()
    final: Path | None = None
    try:
        ensure_dir(layout.tmp_dir)
        digest, size = _copy_hashed(spool, temp)
        final = layout.instance_path(study_uid, sop_uid, digest)
        meta = InstanceMeta(
            sop_instance_uid=sop_uid,
            sop_class_uid=sop_class,
            study_instance_uid=study_uid,
            series_instance_uid=series_uid,
            modality=_text(ds, "Modality", 16),
            transfer_syntax_uid=str(ds.file_meta.get("TransferSyntaxUID", "")) or None,
            path=layout.relative(final),
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
        )
        already = final.exists()
        if not already:
            publish(temp, final)
        else:
            temp.unlink()
        try:
            with db.session() as session:
                outcome, replaced_path, transition = record_instance(session, meta)
        except SQLAlchemyError as exc:
            if not already:
                final.unlink(missing_ok=True)
            log.error("database write failed for instance %s: %s", sop_uid, type(exc).__name__)
            raise StoreError(OUT_OF_RESOURCES_DB, "database unavailable, not stored") from exc
        if replaced_path and replaced_path != meta.path:
            layout.absolute(replaced_path).unlink(missing_ok=True)
        if transition:
            log.info("study %s: %s", study_uid, transition)
        if outcome == RecordOutcome.REPLACED:
            log.warning("instance %s of study %s replaced by a different object", sop_uid, study_uid)
        return IngestResult(outcome=outcome, study_instance_uid=study_uid, sop_instance_uid=sop_uid, path=final)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            reason = "disk full"
        else:
            reason = f"write error ({errno.errorcode.get(exc.errno, exc.errno)})"
        log.error("storage write failed for instance %s: %s", sop_uid, reason)
        raise StoreError(OUT_OF_RESOURCES, f"{reason}, not stored") from exc

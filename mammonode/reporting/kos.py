"""The IHE IOCM rejection note: a Key Object Selection Document titled (113001, DCM,
"Rejected for Quality Reasons") that lists the result objects a newer result version
replaces.

An archive that implements IOCM hides or removes the listed instances, so a reader no
longer sees a superseded result next to its replacement; one that does not simply stores
the note. Pure: the caller passes the headers of the objects to reject (all of one study)
and the note's UIDs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset

from mammonode import __version__
from mammonode.reporting.secondary_capture import MANUFACTURER
from mammonode.reporting.uids import stable_uid

KOS_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"
# The IOCM rejection title, from CID 7010 "Key Object Selection Document Title" (DICOM PS3.16).
REJECTED_FOR_QUALITY = hd.sr.CodedConcept("113001", "DCM", "Rejected for Quality Reasons")
SERIES_NUMBER = 9190
DESCRIPTION = "Superseded by a newer mammonode result version"
# Patient and study attributes highdicom copies from the first evidence item unconditionally.
_COPIED = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate")


def _with_study_attributes(header: Dataset) -> Dataset:
    """A copy with the Type 2 patient/study attributes present (empty when unknown)."""
    out = Dataset()
    out.update(header)
    for keyword in (*_COPIED, "StudyTime"):
        if keyword not in out:
            setattr(out, keyword, "")
    return out


def rejection_note(rejected: Sequence[Dataset], study_uid: str, version: str) -> Dataset:
    """A rejection note of result version ``version`` listing ``rejected`` (headers of the
    study's superseded objects; pixel data not needed). Its evidence is exactly the rejected
    objects: an IOCM archive rejects whatever the note lists. Its UID derives from the
    version and the listed objects, so the same rejection is the same note."""
    if not rejected:
        raise ValueError("a rejection note needs at least one object to reject")
    if {str(ds.StudyInstanceUID) for ds in rejected} != {study_uid}:
        raise ValueError("a rejection note lists objects of its own study only")
    listed = hashlib.sha256("|".join(sorted(str(ds.SOPInstanceUID) for ds in rejected)).encode()).hexdigest()
    content = hd.ko.KeyObjectSelection(
        document_title=REJECTED_FOR_QUALITY,
        referenced_objects=list(rejected),
        description=DESCRIPTION,
    )
    note = hd.ko.KeyObjectSelectionDocument(
        evidence=[_with_study_attributes(rejected[0]), *rejected[1:]],
        content=content,
        series_instance_uid=stable_uid(study_uid, version, "series-kos"),
        series_number=SERIES_NUMBER,
        sop_instance_uid=stable_uid(study_uid, version, f"kos-{listed[:32]}"),
        instance_number=1,
        manufacturer=MANUFACTURER,
    )
    for item in note.ContentSequence:
        if item.ValueType in ("IMAGE", "COMPOSITE"):
            del item.ConceptNameCodeSequence  # TID 2010 rows 8 and 10 name no purpose of reference
    note.SeriesDescription = "Rejected AI results (mammonode)"
    note.SoftwareVersions = __version__
    return note

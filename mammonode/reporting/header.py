"""Header attributes both SRs share: who made them (this installation, each algorithm) and
which request they answer.

Reporting stays pure: the installation's identity is a parameter (:class:`Equipment`); the
node generates it once (:meth:`Equipment.generate`) and keeps it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset

from mammonode.reporting.codes import PROCESSING_EQUIPMENT
from mammonode.reporting.content import Algorithm

MANUFACTURER = "mammonode"
MODEL_NAME = "mammonode"


@dataclass(frozen=True)
class Equipment:
    """This installation as SR Device Observer (TID 1004) and General Equipment.

    ``device_uid`` and ``serial_number`` must be generated once per installation and kept: a
    PACS tells installations apart by them."""

    device_uid: str
    serial_number: str
    institution_name: str | None = None
    physical_location: str | None = None

    @classmethod
    def generate(cls, institution_name: str | None = None, physical_location: str | None = None) -> Equipment:
        """A new identity (2.25 UUID-derived UID, serial from the same UUID); call once, store it."""
        new = uuid.uuid4()
        return cls(f"2.25.{new.int}", f"MN-{new.hex[:12].upper()}", institution_name, physical_location)


# `mammonode predict --results-out` runs outside any installation: its objects name this fixed
# device, so they are recognisable as such and never pass for a node's.
PREDICT_EQUIPMENT = Equipment(device_uid="2.25.321965619150566348962507220985597243912", serial_number="PREDICT")


def _code_item(code: Dataset) -> Dataset:
    item = Dataset()
    for keyword in ("CodeValue", "CodingSchemeDesignator", "CodingSchemeVersion", "CodeMeaning"):
        if keyword in code:
            setattr(item, keyword, code.data_element(keyword).value)
    return item


def referenced_requests(sources: Sequence[Dataset]) -> list[Dataset]:
    """Referenced Request Sequence items, one per (accession, requested procedure) found in the
    sources' Request Attributes Sequence, else one per accession. Type 2 attributes are present
    even when empty (dciodvfy requires Referenced Study Sequence, for one)."""
    seen: dict[tuple[str, str], Dataset] = {}
    for ds in sources:
        requests = list(ds.get("RequestAttributesSequence", []) or []) or [Dataset()]
        for req in requests:
            accession = str(req.get("AccessionNumber", "") or ds.get("AccessionNumber", "") or "")
            procedure_id = str(req.get("RequestedProcedureID", "") or "")
            if (accession, procedure_id) in seen:
                continue
            item = Dataset()
            item.StudyInstanceUID = ds.StudyInstanceUID
            item.ReferencedStudySequence = []
            item.AccessionNumber = accession
            if "IssuerOfAccessionNumberSequence" in req:
                item.IssuerOfAccessionNumberSequence = req.IssuerOfAccessionNumberSequence
            item.PlacerOrderNumberImagingServiceRequest = str(
                req.get("PlacerOrderNumberImagingServiceRequest", "") or ""
            )
            item.FillerOrderNumberImagingServiceRequest = str(
                req.get("FillerOrderNumberImagingServiceRequest", "") or ""
            )
            item.RequestedProcedureID = procedure_id
            item.RequestedProcedureDescription = str(req.get("RequestedProcedureDescription", "") or "")
            item.RequestedProcedureCodeSequence = [
                _code_item(c) for c in req.get("RequestedProcedureCodeSequence", []) or []
            ][:1]
            seen[(accession, procedure_id)] = item
    return list(seen.values())


def hierarchical_references(datasets: Iterable[Dataset]) -> list[Dataset]:
    """The Hierarchical SOP Instance Reference Macro over ``datasets``: one item per study,
    its series, their SOP instances (Current Requested Procedure Evidence, Predecessor
    Documents)."""
    by_study: dict[str, dict[str, list[Dataset]]] = {}
    for ds in datasets:
        ref = Dataset()
        ref.ReferencedSOPClassUID = ds.SOPClassUID
        ref.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        by_study.setdefault(str(ds.StudyInstanceUID), {}).setdefault(str(ds.SeriesInstanceUID), []).append(ref)
    items = []
    for study_uid, series in by_study.items():
        item = Dataset()
        item.StudyInstanceUID = study_uid
        item.ReferencedSeriesSequence = []
        for series_uid, refs in series.items():
            series_item = Dataset()
            series_item.SeriesInstanceUID = series_uid
            series_item.ReferencedSOPSequence = refs
            item.ReferencedSeriesSequence.append(series_item)
        items.append(item)
    return items


def performed_procedure_codes(sources: Sequence[Dataset]) -> list[Dataset]:
    """The study's procedure code (Procedure Code Sequence of the sources) when known."""
    for ds in sources:
        codes = ds.get("ProcedureCodeSequence", []) or []
        if codes:
            return [_code_item(codes[0])]
    return []


def contributing_equipment(algorithms: Iterable[Algorithm], equipment: Equipment) -> list[Dataset]:
    """One Contributing Equipment item per algorithm (IHE AIR: name and version of each model
    that contributed), as Processing Equipment of this installation."""
    items = []
    for algo in algorithms:
        item = Dataset()
        item.Manufacturer = MANUFACTURER
        if equipment.institution_name:
            item.InstitutionName = equipment.institution_name
        item.ManufacturerModelName = algo.name[:64]
        item.DeviceSerialNumber = equipment.serial_number
        item.SoftwareVersions = algo.version[:64]
        purpose = Dataset()
        purpose.CodeValue = PROCESSING_EQUIPMENT.value
        purpose.CodingSchemeDesignator = PROCESSING_EQUIPMENT.scheme_designator
        purpose.CodeMeaning = PROCESSING_EQUIPMENT.meaning
        item.PurposeOfReferenceCodeSequence = [purpose]
        item.ContributionDescription = f"AI algorithm {algo.model}: {algo.name}"[:1024]
        items.append(item)
    return items


def set_equipment(ds: Dataset, software_version: str, equipment: Equipment) -> None:
    """General Equipment of a result: this software on this installation."""
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = MODEL_NAME
    ds.DeviceSerialNumber = equipment.serial_number
    ds.SoftwareVersions = software_version
    if equipment.institution_name:
        ds.InstitutionName = equipment.institution_name

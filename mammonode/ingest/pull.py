"""Pulling studies from a PACS (``mammonode pull``): what to ask for, what is missing, the summary.

A pull queries a ``[[sources]]`` entry for studies (by Study Instance UID, or by a Study
Date range, optionally with Modalities in Study), lists each study's instances, compares
them with what this node already holds (``db.queries.held_instance_uids``) and fetches only
the others. The transports (``pull_dimse.py``: C-FIND, C-MOVE, C-GET; ``pull_dicomweb.py``:
QIDO-RS, WADO-RS) all end in the same place: C-MOVE sends to the running node's listener,
C-GET and WADO-RS hand each received file to :func:`mammonode.ingest.store.ingest`, so
durability, routing rules and assembly are those of a pushed study.

Logs name studies by UID only.
"""

from __future__ import annotations

import logging
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Protocol

from mammonode import audit
from mammonode.config import Source
from mammonode.db.queries import held_instance_uids
from mammonode.db.session import Database
from mammonode.ingest.store import IngestResult

log = logging.getLogger(__name__)

# Called with the number of instances just fetched or failed (the progress display).
Advance = Callable[[int], None]


class PullError(Exception):
    """A pull that cannot go on (source unreachable, association rejected, a query failed,
    HTTP 401): one line for the operator."""


@dataclass(frozen=True)
class RemoteInstance:
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str


@dataclass(frozen=True)
class RemoteStudy:
    study_uid: str
    study_date: str = ""


@dataclass(frozen=True)
class PullQuery:
    study_uids: tuple[str, ...] = ()
    date_range: str = ""  # DICOM range matching: YYYYMMDD-YYYYMMDD, YYYYMMDD-, -YYYYMMDD or YYYYMMDD
    modality: str = ""


@dataclass
class StudyPlan:
    study: RemoteStudy
    instances: list[RemoteInstance]
    missing: list[RemoteInstance]

    @property
    def held(self) -> int:
        return len(self.instances) - len(self.missing)


@dataclass
class Fetched:
    fetched: int = 0
    failed: int = 0
    # Set when storing failed for a reason every later instance would share (database,
    # disk): the pull stopped there, the rest counted as failed; one line for the operator.
    error: str = ""
    # For the audit trail, per study this process stored (C-GET, WADO-RS): its patient and
    # SOP class counts, whether any instance was new (action C), and failures.
    studies: dict[str, audit.StudyObjects] = field(default_factory=dict)
    new_in: set[str] = field(default_factory=set)
    failed_in: dict[str, int] = field(default_factory=dict)

    def stored(self, result: IngestResult, sop_class_uid: str) -> None:
        """Count one instance this process stored (and note it for the audit trail)."""
        self.fetched += 1
        if result.path is None:  # dropped by a routing rule: nothing was kept
            return
        study = self.studies.setdefault(result.study_instance_uid, audit.StudyObjects(result.study_instance_uid))
        study.patient_id = study.patient_id or result.patient_id
        if sop_class_uid:
            study.add(sop_class_uid)
        if result.outcome != "duplicate":
            self.new_in.add(result.study_instance_uid)

    def lost(self, study_uid: str, count: int = 1) -> None:
        """Count instances of a study that failed to arrive or be stored."""
        self.failed += count
        self.failed_in[study_uid] = self.failed_in.get(study_uid, 0) + count


@dataclass
class PullSummary:
    studies_found: int = 0
    instances: int = 0
    fetched: int = 0
    already_held: int = 0
    failed: int = 0
    not_found: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "studies_found": self.studies_found,
            "instances": self.instances,
            "fetched": self.fetched,
            "already_held": self.already_held,
            "failed": self.failed,
            "not_found": list(self.not_found),
        }


class SourceClient(Protocol):
    """One source's transport: query, list, fetch (pull_dimse.py, pull_dicomweb.py)."""

    def find_studies(self, query: PullQuery) -> list[RemoteStudy]: ...

    def list_instances(self, study_uid: str, modality: str) -> list[RemoteInstance]: ...

    def fetch(self, plans: list[StudyPlan], advance: Advance, total: Fetched) -> None:
        """Fetch the missing instances, counting into ``total`` as they come (so what came
        before a PullError is still known, and audited)."""


_DATE = re.compile(r"^(\d{8})?-?(\d{8})?$")


def error_reason(exc: BaseException) -> str:
    """An unexpected error as one short line: its type and the first line of its text
    (SQLAlchemy's errors carry the statement and its parameters, which may name a patient,
    on the lines after)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def parse_date_range(text: str) -> str:
    """``FROM-TO`` as YYYYMMDD-YYYYMMDD (either end may be open, or one date): the DICOM
    range-matching form. ValueError with the reason otherwise."""
    text = text.strip()
    found = _DATE.match(text)
    if not text or text == "-" or not found:
        raise ValueError(f"expected YYYYMMDD-YYYYMMDD (either end may be left open), got {text!r}")
    ends: list[date | None] = []
    for part in found.groups():
        try:
            ends.append(datetime.strptime(part, "%Y%m%d").date() if part else None)
        except ValueError:
            raise ValueError(f"{part} is not a valid date (YYYYMMDD)") from None
    if "-" not in text:
        return text
    start, end = ends
    if start and end and start > end:
        raise ValueError(f"the range ends ({end:%Y%m%d}) before it starts ({start:%Y%m%d})")
    return text


def plan(client: SourceClient, query: PullQuery, db: Database) -> tuple[list[StudyPlan], list[str]]:
    """The studies the source holds for ``query``, each with its instances and those this
    node lacks; and the asked-for Study Instance UIDs the source does not have."""
    studies = client.find_studies(query)
    seen: dict[str, RemoteStudy] = {}
    for study in studies:
        seen.setdefault(study.study_uid, study)
    not_found = [uid for uid in query.study_uids if uid not in seen]
    plans = []
    for study in seen.values():
        instances = client.list_instances(study.study_uid, query.modality)
        with db.session() as session:
            held = held_instance_uids(session, [i.sop_uid for i in instances])
        missing = [i for i in instances if i.sop_uid not in held]
        log.info(
            "pull: study %s has %d instances at the source, %d held, %d to fetch",
            study.study_uid,
            len(instances),
            len(instances) - len(missing),
            len(missing),
        )
        plans.append(StudyPlan(study, instances, missing))
    return plans, not_found


def summarise(plans: list[StudyPlan], not_found: list[str], fetched: Fetched | None) -> PullSummary:
    return PullSummary(
        studies_found=len(plans),
        instances=sum(len(p.instances) for p in plans),
        fetched=fetched.fetched if fetched else 0,
        already_held=sum(p.held for p in plans),
        failed=fetched.failed if fetched else 0,
        not_found=not_found,
    )


def series_requests(plan: StudyPlan) -> list[tuple[str, bool, list[RemoteInstance]]]:
    """The study's missing instances by series: (series UID, whole, instances). A whole series
    (nothing of it held) is fetched in one request, the others instance by instance."""
    listed: dict[str, set[str]] = {}
    for item in plan.instances:
        listed.setdefault(item.series_uid, set()).add(item.sop_uid)
    groups: dict[str, list[RemoteInstance]] = {}
    for item in plan.missing:
        groups.setdefault(item.series_uid, []).append(item)
    return [(series, {i.sop_uid for i in items} == listed[series], items) for series, items in groups.items()]


def audit_fetched(source: Source, fetched: Fetched, how: str) -> None:
    """110104 per study this process stored from ``source`` (C-GET, WADO-RS: the listener
    records C-MOVE arrivals itself): the source as Source, this node, which asked, as
    Destination. Action C when anything was new, U when all was held already."""
    ctx = audit.context()
    if ctx is None:
        return
    if source.kind == "dicomweb":
        peer = audit.Participant(
            source.url, False, audit.messages.SOURCE, urllib.parse.urlsplit(source.url).hostname or ""
        )
    else:
        peer = audit.Participant(source.ae_title, False, audit.messages.SOURCE, source.host)
    us = ctx.node(True, audit.messages.DESTINATION)
    for uid, study in fetched.studies.items():
        failed = fetched.failed_in.get(uid, 0)
        description = f"pulled with {how}" + (f"; {failed} instances failed" if failed else "")
        audit.emit(
            audit.messages.instances_transferred(
                ctx.source,
                peer,
                us,
                study,
                action="C" if uid in fetched.new_in else "U",
                outcome=audit.messages.MINOR_FAILURE if failed else audit.messages.SUCCESS,
                description=description,
            )
        )

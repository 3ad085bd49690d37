"""Recording received instances and keeping each study's input selection current."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import NamedTuple

from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from mammonode.db.models import Event, Instance, Job, JobState, Study, StudyState, utcnow
from mammonode.db.session import locked
from mammonode.exam.views import VIEWS


class RecordOutcome(StrEnum):
    NEW = "new"
    DUPLICATE = "duplicate"
    REPLACED = "replaced"


# Why an instance is kept but never used as pipeline input: its Patient ID is not the
# study's (the first one recorded). The reason names neither ID; queries count rows by it.
OTHER_PATIENT = "quarantined: Patient ID differs from the study's; not used as pipeline input"
OTHER_PATIENT_NOTE = "flagged: holds images of another Patient ID (quarantined, not used)"


def held_reason(rule: str | None) -> str:
    """Why an instance received under a ``store`` rule is never pipeline input."""
    return f"held by rule {rule!r} (store): kept, never pipeline input"


class Recorded(NamedTuple):
    outcome: RecordOutcome
    replaced_path: str | None  # the older file, when a different object replaced it
    transition: str | None  # the study's state change, for the log
    other_patient: bool  # kept but quarantined: its Patient ID is not the study's


class InstanceConflict(Exception):
    """The SOP Instance UID is already recorded in another study. Moving it would take an
    acknowledged image away from the first study, so the new object is refused."""

    def __init__(self, sop_instance_uid: str, study_instance_uid: str):
        super().__init__(f"instance {sop_instance_uid} already recorded in study {study_instance_uid}")
        self.sop_instance_uid = sop_instance_uid
        self.study_instance_uid = study_instance_uid


@dataclass(frozen=True)
class InstanceMeta:
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str | None
    modality: str | None
    transfer_syntax_uid: str | None
    path: str
    size: int
    sha256: str
    view: str
    usable: bool
    reason: str | None
    mirrored: bool | None  # stored mirrored per Patient Orientation; None: it does not say
    acquired: str | None
    calling_ae_title: str | None
    patient_id: str | None = None
    patient_name: str | None = None
    accession_number: str | None = None
    study_date: str | None = None
    rule: str | None = None  # the [[rules]] entry it was received under
    held: bool = False  # that rule's action is `store`: kept, never pipeline input


def _upsert_study(session: Session, meta: InstanceMeta, now: datetime) -> tuple[Study, bool]:
    """The study row (and whether this call created it); safe when two listeners create it
    at once."""
    values = dict(
        study_instance_uid=meta.study_instance_uid,
        state=StudyState.RECEIVING,
        version=0,
        received_at=now,
        last_instance_at=now,
        updated_at=now,
        patient_id=meta.patient_id,
        patient_name=meta.patient_name,
        accession_number=meta.accession_number,
        study_date=meta.study_date,
    )
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert(Study).values(**values).on_conflict_do_nothing(index_elements=["study_instance_uid"])
    created = session.execute(stmt).rowcount == 1
    query = select(Study).where(Study.study_instance_uid == meta.study_instance_uid)
    return session.execute(locked(query, session)).scalar_one(), created


def selection(instances: list[Instance]) -> dict[str, Instance]:
    """The pipeline input per view: the newest usable image (acquisition date/time, then
    arrival, then row id), so that a retake supersedes the first exposure."""
    chosen: dict[str, Instance] = {}
    for inst in instances:
        if not inst.usable or inst.view not in VIEWS:
            continue
        current = chosen.get(inst.view)
        key = (inst.acquired or "", inst.received_at, inst.id or 0)
        if current is None or key > (current.acquired or "", current.received_at, current.id or 0):
            chosen[inst.view] = inst
    return chosen


def selection_key(chosen: dict[str, Instance]) -> str:
    lines = [f"{view}:{chosen[view].sop_instance_uid}:{chosen[view].sha256}" for view in VIEWS if view in chosen]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def usable_counts(instances: list[Instance]) -> dict[str, int]:
    counts = {view: 0 for view in VIEWS}
    for inst in instances:
        if inst.usable and inst.view in counts:
            counts[inst.view] += 1
    return counts


def record_event(
    session: Session, level: str, kind: str, message: str, study_uid: str | None = None, seconds: float | None = None
) -> None:
    session.add(Event(level=level, kind=kind, message=message, study_instance_uid=study_uid, seconds=seconds))


def _other_patient(study: Study, meta: InstanceMeta) -> bool:
    """Whether the instance names a patient other than the study's first recorded one (one
    Study Instance UID for two patients: a mis-merge or a reused UID)."""
    return bool(study.patient_id and meta.patient_id and meta.patient_id != study.patient_id)


def _flag_other_patient(session: Session, study: Study, meta: InstanceMeta) -> None:
    study.note = OTHER_PATIENT_NOTE
    record_event(
        session,
        "ERROR",
        "patient-mismatch",
        f"instance {meta.sop_instance_uid}: Patient ID differs from the study's; kept, not used as pipeline input",
        meta.study_instance_uid,
    )


def record_instance(session: Session, meta: InstanceMeta) -> Recorded:
    """Insert or update the instance row and move its study's state.

    Raises :class:`InstanceConflict` (nothing written) when the SOP Instance UID belongs to
    another study. An instance of another patient than the study's is recorded unusable
    and the study flagged, so that one exam never mixes two patients' images."""
    now = utcnow()
    existing = session.execute(
        select(Instance).where(Instance.sop_instance_uid == meta.sop_instance_uid)
    ).scalar_one_or_none()
    if existing is not None and existing.study.study_instance_uid != meta.study_instance_uid:
        raise InstanceConflict(meta.sop_instance_uid, existing.study.study_instance_uid)
    study, created = _upsert_study(session, meta, now)
    before = None if created else study.state
    for field in ("patient_id", "patient_name", "accession_number", "study_date"):
        if getattr(study, field) is None and getattr(meta, field) is not None:
            setattr(study, field, getattr(meta, field))
    replaced_path = None
    if existing is not None and existing.sha256 == meta.sha256:
        return Recorded(RecordOutcome.DUPLICATE, None, None, False)
    fields = {
        k: getattr(meta, k)
        for k in (
            "sop_class_uid",
            "series_instance_uid",
            "modality",
            "transfer_syntax_uid",
            "path",
            "size",
            "sha256",
            "view",
            "usable",
            "reason",
            "acquired",
            "calling_ae_title",
            "rule",
            "held",
        )
    }
    if meta.held:
        fields["usable"], fields["reason"] = False, held_reason(meta.rule)
    fields["faces_expected"] = None if meta.mirrored is None else not meta.mirrored
    other_patient = _other_patient(study, meta)
    if other_patient:
        fields["usable"], fields["reason"] = False, OTHER_PATIENT
        _flag_other_patient(session, study, meta)
    if existing is None:
        session.add(Instance(study_id=study.id, sop_instance_uid=meta.sop_instance_uid, received_at=now, **fields))
        outcome = RecordOutcome.NEW
    else:
        replaced_path = existing.path
        for key, value in fields.items():
            setattr(existing, key, value)
        existing.received_at = now
        existing.revisions += 1
        outcome = RecordOutcome.REPLACED
        record_event(
            session,
            "WARNING",
            "instance-replaced",
            f"instance {meta.sop_instance_uid} replaced by a different object",
            meta.study_instance_uid,
        )
    session.flush()
    study.last_instance_at = now
    study.updated_at = now
    refresh_selection(session, study)
    if study.state == StudyState.RECEIVING and all(i.held for i in study.instances):
        study.state = StudyState.STORED
    if before is None:
        transition = f"new study, {study.state}"
    elif before != study.state:
        transition = f"{before} -> {study.state} (new inputs)"
    else:
        transition = None
    return Recorded(outcome, replaced_path, transition, other_patient)


def refresh_selection(session: Session, study: Study) -> bool:
    """Recompute the study's inputs; when they changed, go back to receiving (a queued job
    for the old inputs is superseded). Returns whether the selection changed."""
    session.refresh(study, ["instances"])
    key = selection_key(selection(study.instances))
    if key == study.selection_key:
        return False
    study.selection_key = key
    study.version += 1
    if study.state != StudyState.RECEIVING:
        for job in session.execute(select(Job).where(Job.study_id == study.id, Job.state == JobState.QUEUED)).scalars():
            job.state = JobState.SUPERSEDED
            job.finished_at = utcnow()
        study.state = StudyState.RECEIVING
    return True


def mark_unusable(session: Session, study_id: int, view: str, reason: str) -> None:
    """Take the view's chosen input out of the selection after the pipeline could not use
    it, so the study runs again with another image of that view or waits for one (and then
    shows up as incomplete), instead of failing the same way forever."""
    study = session.get(Study, study_id)
    chosen = selection(study.instances).get(view)
    if chosen is None:
        return
    chosen.usable = False
    chosen.reason = f"not usable as pipeline input: {reason}"[:1000]
    session.flush()
    record_event(
        session,
        "ERROR",
        "instance-unusable",
        f"{view} instance {chosen.sop_instance_uid}: {reason}",
        study.study_instance_uid,
    )
    refresh_selection(session, study)


def instance_path(session: Session, sop_instance_uid: str) -> str | None:
    """The recorded file of an instance, if any."""
    return session.execute(
        select(Instance.path).where(Instance.sop_instance_uid == sop_instance_uid)
    ).scalar_one_or_none()


def instance_paths(session: Session) -> list[str]:
    return list(session.execute(select(Instance.path)).scalars())


def other_patient_count(session: Session) -> int:
    """Instances kept but quarantined because their Patient ID is not their study's."""
    query = select(func.count()).select_from(Instance).where(Instance.reason == OTHER_PATIENT)
    return session.execute(query).scalar_one()


def known_paths(session: Session) -> set[str]:
    from mammonode.db.models import ResultObject

    paths = set(session.execute(select(Instance.path)).scalars())
    paths.update(session.execute(select(ResultObject.path)).scalars())
    return paths

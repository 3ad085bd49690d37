"""Recording received instances and keeping each study's input selection current."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from mammonode.db.models import Event, Instance, Job, JobState, Study, StudyState, utcnow
from mammonode.db.session import locked
from mammonode.exam.views import VIEWS


class RecordOutcome(StrEnum):
    NEW = "new"
    DUPLICATE = "duplicate"
    REPLACED = "replaced"


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


def record_instance(session: Session, meta: InstanceMeta) -> tuple[RecordOutcome, str | None, str | None]:
    """Insert or update the instance row and move its study's state. Returns the outcome,
    the older file's path when a different object replaced an older one, and the study's
    state transition (for the log) if there was one."""
    now = utcnow()
    study, created = _upsert_study(session, meta, now)
    before = None if created else study.state
    for field in ("patient_id", "patient_name", "accession_number", "study_date"):
        if getattr(study, field) is None and getattr(meta, field) is not None:
            setattr(study, field, getattr(meta, field))
    existing = session.execute(
        select(Instance).where(Instance.sop_instance_uid == meta.sop_instance_uid)
    ).scalar_one_or_none()
    replaced_path = None
    if existing is not None and existing.sha256 == meta.sha256:
        return RecordOutcome.DUPLICATE, None, None
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
        )
    }
    fields["faces_expected"] = None if meta.mirrored is None else not meta.mirrored
    if existing is None:
        session.add(Instance(study_id=study.id, sop_instance_uid=meta.sop_instance_uid, received_at=now, **fields))
        outcome = RecordOutcome.NEW
    else:
        replaced_path = existing.path
        if existing.study_id != study.id:
            existing.study_id = study.id
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
    if before is None:
        transition = "new study, receiving"
    elif before != study.state:
        transition = f"{before} -> {study.state} (new inputs)"
    else:
        transition = None
    return outcome, replaced_path, transition


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


def known_paths(session: Session) -> set[str]:
    from mammonode.db.models import ResultObject

    paths = set(session.execute(select(Instance.path)).scalars())
    paths.update(session.execute(select(ResultObject.path)).scalars())
    return paths

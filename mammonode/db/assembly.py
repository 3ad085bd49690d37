"""Study readiness: when a study's four views are in and it has been quiet, queue a job.

Completeness is content-aware (one usable For Presentation image of each of L-CC, R-CC,
L-MLO, R-MLO) plus an inactivity timer (``study.quiet_period_s``, because a modality sends
views one by one and may retake one). A study still missing views when nothing has arrived
for ``study.incomplete_timeout_s`` becomes ``incomplete`` and says which views it lacks.
The tick is safe to run from several processes at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from mammonode.db.models import Instance, Job, JobState, Study, StudyState, utcnow
from mammonode.db.records import record_event, selection, selection_key
from mammonode.db.session import locked
from mammonode.exam.views import VIEWS


@dataclass(frozen=True)
class TickResult:
    queued: list[str]
    incomplete: list[str]


def missing_views(instances: list[Instance]) -> list[str]:
    chosen = selection(instances)
    return [view for view in VIEWS if view not in chosen]


def enqueue(session: Session, study: Study, now: datetime | None = None) -> Job:
    """A job for the study's current inputs (any queued job for older inputs is superseded)."""
    now = now or utcnow()
    for job in session.execute(select(Job).where(Job.study_id == study.id, Job.state == JobState.QUEUED)).scalars():
        job.state = JobState.SUPERSEDED
        job.finished_at = now
    job = Job(
        study_id=study.id,
        selection_key=study.selection_key or "",
        study_version=study.version,
        state=JobState.QUEUED,
        created_at=now,
    )
    session.add(job)
    study.state = StudyState.QUEUED
    study.updated_at = now
    return job


def tick(
    session: Session, quiet_period_s: float, incomplete_timeout_s: float, now: datetime | None = None
) -> TickResult:
    now = now or utcnow()
    query = locked(select(Study).where(Study.state == StudyState.RECEIVING), session, skip_locked=True)
    queued, incomplete = [], []
    for study in session.execute(query).scalars():
        chosen = selection(study.instances)
        quiet_for = (now - study.last_instance_at).total_seconds()
        if all(view in chosen for view in VIEWS):
            if quiet_for >= quiet_period_s:
                study.selection_key = selection_key(chosen)
                enqueue(session, study, now)
                record_event(session, "INFO", "study-queued", "all four views in; job queued", study.study_instance_uid)
                queued.append(study.study_instance_uid)
        elif quiet_for >= incomplete_timeout_s:
            lacking = [view for view in VIEWS if view not in chosen]
            study.state = StudyState.INCOMPLETE
            study.updated_at = now
            study.note = "missing views: " + ", ".join(lacking)
            record_event(
                session,
                "WARNING",
                "study-incomplete",
                f"no new instance for {int(quiet_for)} s; missing {', '.join(lacking)}",
                study.study_instance_uid,
            )
            incomplete.append(study.study_instance_uid)
    return TickResult(queued=queued, incomplete=incomplete)


def is_ready(study: Study, quiet_period_s: float, now: datetime | None = None) -> bool:
    """A receiving study whose views are complete and quiet, waiting for the next tick."""
    now = now or utcnow()
    if study.state != StudyState.RECEIVING:
        return False
    if missing_views(study.instances):
        return False
    return now - study.last_instance_at >= timedelta(seconds=quiet_period_s)

"""Study readiness: when a study's four views are in and it has been quiet, queue a job.

Completeness is content-aware (one usable For Presentation image of each of L-CC, R-CC,
L-MLO, R-MLO) plus an inactivity timer (``study.quiet_period_s``, because a modality sends
views one by one and may retake one). A study still missing views when nothing has arrived
for ``study.incomplete_timeout_s`` becomes ``incomplete`` and says which views it lacks,
or, with ``study.incomplete_policy = "image_wise"``, gets a job for the views it has (the
worker runs the image-wise models on them: a partial result). ``process`` queues a waiting
study now, with what it has. The tick is safe to run from several processes at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from mammonode.db import notifications
from mammonode.db.models import Instance, Job, JobState, Study, StudyState, utcnow
from mammonode.db.records import OTHER_PATIENT_NOTE, record_event, selection, selection_key
from mammonode.db.session import locked
from mammonode.exam.views import VIEWS


@dataclass(frozen=True)
class TickResult:
    queued: list[str]
    incomplete: list[str]
    partial: list[str] = field(default_factory=list)  # incomplete, queued for a partial result


def partial_note(lacking: list[str]) -> str:
    """The study note of a partial run: which views it lacks."""
    return "partial result (image-wise models only); missing views: " + ", ".join(lacking)


def _note(study: Study, note: str | None) -> None:
    if study.note != OTHER_PATIENT_NOTE:  # the flag of a mis-merged study outlives its jobs
        study.note = note


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


def _notify_incomplete(
    session: Session, study: Study, chosen: dict, lacking: list[str], quiet_for: float, policy: str
) -> None:
    partial = policy == "image_wise" and bool(chosen)
    details = {
        "views": [view for view in VIEWS if view in chosen],
        "missing_views": lacking,
        "quiet_for_s": round(quiet_for, 1),
        "incomplete_policy": policy,
        "partial_result_queued": partial,  # then result.ready follows, for the views present
    }
    notifications.queue(session, notifications.STUDY_INCOMPLETE, study.study_instance_uid, details)


def tick(
    session: Session,
    quiet_period_s: float,
    incomplete_timeout_s: float,
    now: datetime | None = None,
    incomplete_policy: str = "wait",
) -> TickResult:
    """``incomplete_policy``: "wait" (a study missing views after the timeout becomes
    incomplete) or "image_wise" (it is queued for a partial result when it has a usable view)."""
    now = now or utcnow()
    query = locked(select(Study).where(Study.state == StudyState.RECEIVING), session, skip_locked=True)
    queued, incomplete, partial = [], [], []
    for study in session.execute(query).scalars():
        chosen = selection(study.instances)
        quiet_for = (now - study.last_instance_at).total_seconds()
        if all(view in chosen for view in VIEWS):
            if quiet_for >= quiet_period_s:
                study.selection_key = selection_key(chosen)
                enqueue(session, study, now)
                record_event(session, "INFO", "study-queued", "all four views in; job queued", study.study_instance_uid)
                queued.append(study.study_instance_uid)
        elif quiet_for >= incomplete_timeout_s and chosen and incomplete_policy == "image_wise":
            lacking = [view for view in VIEWS if view not in chosen]
            study.selection_key = selection_key(chosen)
            enqueue(session, study, now)
            _note(study, partial_note(lacking))
            record_event(
                session,
                "WARNING",
                "study-partial",
                f"no new instance for {int(quiet_for)} s; missing {', '.join(lacking)}; "
                "job queued for the image-wise models (partial result)",
                study.study_instance_uid,
            )
            _notify_incomplete(session, study, chosen, lacking, quiet_for, incomplete_policy)
            partial.append(study.study_instance_uid)
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
            _notify_incomplete(session, study, chosen, lacking, quiet_for, incomplete_policy)
            incomplete.append(study.study_instance_uid)
    return TickResult(queued=queued, incomplete=incomplete, partial=partial)


def process(session: Session, study: Study, now: datetime | None = None) -> dict:
    """Queue a waiting (receiving or incomplete) study now, with the views it has: the full
    pipeline when all four are in, else the image-wise models (a partial result). ValueError
    says why not (already queued, running or processed; no usable view)."""
    if study.state in (StudyState.QUEUED, StudyState.RUNNING):
        raise ValueError(f"study {study.study_instance_uid} is already {study.state}")
    if study.state == StudyState.STORED:
        raise ValueError(f"study {study.study_instance_uid} is held by a store rule ([[rules]]): never processed")
    if study.state in (StudyState.DONE, StudyState.FAILED):
        raise ValueError(
            f"study {study.study_instance_uid} is already processed ({study.state}); "
            "`mammonode retry --force` runs it again"
        )
    chosen = selection(study.instances)
    if not chosen:
        raise ValueError(f"study {study.study_instance_uid} has no usable image of L-CC, R-CC, L-MLO or R-MLO")
    lacking = [view for view in VIEWS if view not in chosen]
    study.selection_key = selection_key(chosen)
    enqueue(session, study, now)
    _note(study, partial_note(lacking) if lacking else None)
    message = "queued by `mammonode process`"
    if lacking:
        message += f"; missing {', '.join(lacking)} (partial result)"
    record_event(session, "INFO", "study-process", message, study.study_instance_uid)
    return {
        "study_instance_uid": study.study_instance_uid,
        "job_queued": True,
        "partial": bool(lacking),
        "missing_views": lacking,
    }


def is_ready(study: Study, quiet_period_s: float, now: datetime | None = None) -> bool:
    """A receiving study whose views are complete and quiet, waiting for the next tick."""
    now = now or utcnow()
    if study.state != StudyState.RECEIVING:
        return False
    if missing_views(study.instances):
        return False
    return now - study.last_instance_at >= timedelta(seconds=quiet_period_s)

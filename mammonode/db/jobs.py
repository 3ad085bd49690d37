"""The job queue: claiming, heartbeats, completion and stale-job recovery.

PostgreSQL claims with ``SELECT ... FOR UPDATE SKIP LOCKED`` so that any number of workers
on any number of machines never take the same job; on SQLite every transaction begins
``IMMEDIATE`` (see db.session), which makes the claim single-writer. A job whose worker
stopped heartbeating is re-queued (or failed once it has used its attempts).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from mammonode.db import notifications
from mammonode.db.models import Job, JobState, Study, StudyState, Worker, utcnow
from mammonode.db.records import OTHER_PATIENT_NOTE, record_event
from mammonode.db.session import locked


@dataclass(frozen=True)
class ClaimedJob:
    job_id: int
    study_id: int
    study_instance_uid: str
    selection_key: str
    study_version: int
    attempt: int


def register_worker(session: Session, worker_id: str, device: str) -> None:
    now = utcnow()
    worker = session.get(Worker, worker_id)
    if worker is None:
        session.add(
            Worker(
                id=worker_id,
                hostname=socket.gethostname(),
                pid=os.getpid(),
                device=device,
                started_at=now,
                heartbeat_at=now,
            )
        )
    else:
        worker.heartbeat_at = now
        worker.stopped_at = None
        worker.pid = os.getpid()
        worker.device = device


def heartbeat(session: Session, worker_id: str, job_id: int | None) -> None:
    now = utcnow()
    session.execute(update(Worker).where(Worker.id == worker_id).values(heartbeat_at=now))
    if job_id is not None:
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.worker_id == worker_id, Job.state == JobState.RUNNING)
            .values(heartbeat_at=now)
        )


def worker_stopped(session: Session, worker_id: str) -> None:
    session.execute(update(Worker).where(Worker.id == worker_id).values(stopped_at=utcnow()))


def recover_stale(session: Session, stale_after_s: float, max_attempts: int, now: datetime | None = None) -> list[int]:
    """Re-queue running jobs whose worker stopped heartbeating."""
    now = now or utcnow()
    limit = now - timedelta(seconds=stale_after_s)
    query = locked(select(Job).where(Job.state == JobState.RUNNING, Job.heartbeat_at < limit), session, True)
    recovered = []
    for job in session.execute(query).scalars():
        study = session.get(Study, job.study_id)
        message = f"worker {job.worker_id} stopped heartbeating during attempt {job.attempts}"
        _retry_or_fail(session, job, study, message, max_attempts, now)
        recovered.append(job.id)
    return recovered


def _retry_or_fail(session: Session, job: Job, study: Study, message: str, max_attempts: int, now: datetime) -> None:
    job.last_error = message
    job.worker_id = None
    if job.attempts < max_attempts:
        job.state = JobState.QUEUED
        if study.selection_key == job.selection_key and study.state == StudyState.RUNNING:
            study.state = StudyState.QUEUED
        record_event(
            session, "WARNING", "job-requeued", f"job {job.id}: {message}; re-queued", study.study_instance_uid
        )
    else:
        job.state = JobState.FAILED
        job.finished_at = now
        if study.selection_key == job.selection_key:
            study.state = StudyState.FAILED
            study.note = message[:500]
            notifications.queue(
                session,
                notifications.STUDY_FAILED,
                study.study_instance_uid,
                {"job_id": job.id, "attempts": job.attempts, "error": message[:2000]},
            )
        record_event(
            session, "ERROR", "job-failed", f"job {job.id}: {message}; no attempts left", study.study_instance_uid
        )
    study.updated_at = now


def claim(session: Session, worker_id: str) -> ClaimedJob | None:
    now = utcnow()
    query = select(Job).where(Job.state == JobState.QUEUED).order_by(Job.created_at, Job.id).limit(1)
    job = session.execute(locked(query, session, skip_locked=True)).scalar_one_or_none()
    if job is None:
        return None
    job.state = JobState.RUNNING
    job.worker_id = worker_id
    job.attempts += 1
    job.started_at = now
    job.heartbeat_at = now
    study = session.get(Study, job.study_id)
    if study.selection_key == job.selection_key:
        study.state = StudyState.RUNNING
        study.updated_at = now
    return ClaimedJob(
        job_id=job.id,
        study_id=study.id,
        study_instance_uid=study.study_instance_uid,
        selection_key=job.selection_key,
        study_version=job.study_version,
        attempt=job.attempts,
    )


def _owned(session: Session, job_id: int, worker_id: str) -> Job | None:
    job = session.execute(locked(select(Job).where(Job.id == job_id), session)).scalar_one_or_none()
    if job is None or job.state != JobState.RUNNING or job.worker_id != worker_id:
        return None  # re-queued meanwhile (we were presumed dead): our result is not ours to record
    return job


def set_stage(session: Session, job_id: int, worker_id: str, stage: str) -> None:
    """Record the running job's current pipeline stage (for `study` and the status page)."""
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.worker_id == worker_id, Job.state == JobState.RUNNING)
        .values(stage=stage[:32])
    )


def finish(session: Session, job_id: int, worker_id: str, timings: dict, result: dict, note: str | None = None) -> bool:
    """``note``: the study's note for this result (a partial result says which views it lacks)."""
    job = _owned(session, job_id, worker_id)
    if job is None:
        return False
    now = utcnow()
    job.state = JobState.DONE
    job.finished_at = now
    job.timings = timings
    job.result = result
    job.last_error = None
    study = session.get(Study, job.study_id)
    study.processed_key = job.selection_key
    if study.selection_key == job.selection_key:
        study.state = StudyState.DONE
        if study.note != OTHER_PATIENT_NOTE:  # the flag of a mis-merged study outlives its jobs
            study.note = note
    study.updated_at = now
    record_event(
        session, "INFO", "job-done", f"job {job.id} done", study.study_instance_uid, seconds=timings.get("total")
    )
    notifications.queue(
        session,
        notifications.RESULT_READY,
        study.study_instance_uid,
        {"job_id": job.id, **notifications.result_summary(result, note, study.result_version)},
    )
    return True


def fail(session: Session, job_id: int, worker_id: str, error: str, max_attempts: int, permanent: bool = False) -> None:
    job = _owned(session, job_id, worker_id)
    if job is None:
        return
    study = session.get(Study, job.study_id)
    _retry_or_fail(session, job, study, error[:2000], job.attempts if permanent else max_attempts, utcnow())


def release(session: Session, job_id: int, worker_id: str) -> None:
    """Give a running job back on shutdown without counting the attempt."""
    job = _owned(session, job_id, worker_id)
    if job is None:
        return
    job.state = JobState.QUEUED
    job.attempts = max(0, job.attempts - 1)
    job.worker_id = None
    study = session.get(Study, job.study_id)
    if study.selection_key == job.selection_key and study.state == StudyState.RUNNING:
        study.state = StudyState.QUEUED
    record_event(session, "INFO", "job-released", f"job {job.id} re-queued at shutdown", study.study_instance_uid)

"""Admin actions on the database: re-queueing a study, and choosing what a purge removes.

Files are not touched here (the service's purge removes them); each action records an event.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from mammonode.db import outbox
from mammonode.db.assembly import enqueue, missing_views
from mammonode.db.models import Study, StudyState, utcnow
from mammonode.db.records import record_event
from mammonode.exam.views import VIEWS


def retry(session: Session, study: Study, force: bool = False) -> dict:
    """Re-send failed deliveries; re-queue a failed study (or any study with ``force``). A
    study lacking views is re-queued only when it was run before (a partial result, run again
    the same way); an incomplete one is refused (``process`` runs it with what it has)."""
    resent = outbox.reset_for_retry(session, study, include_delivered=force)
    requeued = False
    lacking = missing_views(study.instances)
    if study.state == StudyState.FAILED or (force and study.state in (StudyState.DONE, StudyState.INCOMPLETE)):
        if lacking and (study.state == StudyState.INCOMPLETE or len(lacking) == len(VIEWS)):
            raise ValueError(
                f"study lacks views {', '.join(lacking)}; nothing to run "
                "(`mammonode process UID` runs the image-wise models on the views it has)"
            )
        enqueue(session, study)
        requeued = True
    record_event(
        session,
        "INFO",
        "retry",
        f"retry: {resent} deliveries re-sent, job re-queued: {requeued}",
        study.study_instance_uid,
    )
    return {"study_instance_uid": study.study_instance_uid, "deliveries_reset": resent, "job_queued": requeued}


def purgeable(session: Session, older_than_days: float) -> tuple[list[Study], int]:
    """Finished studies (held ones, which never run, included) not touched for
    ``older_than_days``, and how many such studies are kept back because deliveries are
    still pending."""
    limit = utcnow() - timedelta(days=older_than_days)
    finished = [StudyState.DONE, StudyState.FAILED, StudyState.INCOMPLETE, StudyState.STORED]
    studies = session.execute(select(Study).where(Study.state.in_(finished), Study.updated_at < limit)).scalars()
    removable, pending = [], 0
    for study in studies:
        if outbox.waiting_count(session, study):
            pending += 1
        else:
            removable.append(study)
    return removable, pending

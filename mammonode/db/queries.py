"""Read models for the CLI and the status endpoints (nothing here changes the database).

The JSON shapes here are the documented, stable schema of ``--json`` output (README,
"Admin CLI"). Patient identifiers appear only when ``show_phi`` is set.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from mammonode.db.assembly import is_ready, missing_views
from mammonode.db.commitment import shown_state
from mammonode.db.models import (
    CommitmentState,
    Delivery,
    DeliveryState,
    Event,
    Instance,
    Job,
    JobState,
    NotifyDelivery,
    NotifyEvent,
    ResultObject,
    Study,
    StudyState,
    Worker,
    utcnow,
)
from mammonode.db.notifications import HOOK_REMOVED
from mammonode.db.records import OTHER_PATIENT, other_patient_count, usable_counts


def iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def local_time(iso_text: str | None) -> str:
    """An ISO 8601 timestamp as local time with its zone, to the second (human output: the
    CLI's tables and the status page; JSON keeps ISO 8601 with offset)."""
    if not iso_text:
        return ""
    return datetime.fromisoformat(iso_text).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def rule_counts(instances: list) -> dict[str, int]:
    counts: dict[str, int] = {}
    for inst in instances:
        if inst.rule is not None:
            counts[inst.rule] = counts.get(inst.rule, 0) + 1
    return counts


def study_summary(session: Session, study: Study, quiet_period_s: float, show_phi: bool = False) -> dict:
    instances = study.instances
    state = study.state
    if state == StudyState.RECEIVING and is_ready(study, quiet_period_s):
        state = StudyState.READY
    out = {
        "study_instance_uid": study.study_instance_uid,
        "state": state,
        "views": usable_counts(instances),
        "missing_views": missing_views(instances),
        "instances": len(instances),
        "received_at": iso(study.received_at),
        "updated_at": iso(study.updated_at),
        "note": study.note,
        # Kept but never pipeline input: their Patient ID is not the study's.
        "quarantined_instances": sum(1 for i in instances if i.reason == OTHER_PATIENT),
        # Received under a `store` rule: kept, never pipeline input.
        "held_instances": sum(1 for i in instances if i.held),
        # Which [[rules]] entries its instances were received under, and how many each
        # (instances received before rules existed are not counted).
        "rules": rule_counts(instances),
    }
    if show_phi:
        out["patient_id"] = study.patient_id
        out["patient_name"] = study.patient_name
        out["accession_number"] = study.accession_number
        out["study_date"] = study.study_date
    return out


def list_studies(
    session: Session, quiet_period_s: float, state: str | None = None, limit: int = 50, show_phi: bool = False
) -> list[dict]:
    query = select(Study).order_by(Study.updated_at.desc(), Study.id.desc()).limit(limit)
    if state is not None and state != StudyState.READY:
        query = query.where(Study.state == state)
    elif state == StudyState.READY:
        query = query.where(Study.state == StudyState.RECEIVING)
    rows = [study_summary(session, s, quiet_period_s, show_phi) for s in session.execute(query).scalars()]
    if state == StudyState.READY:
        rows = [r for r in rows if r["state"] == StudyState.READY]
    return rows


def find_study(session: Session, uid: str) -> Study | None:
    return session.execute(select(Study).where(Study.study_instance_uid == uid)).scalar_one_or_none()


def study_detail(session: Session, study: Study, quiet_period_s: float, show_phi: bool = False) -> dict:
    out = study_summary(session, study, quiet_period_s, show_phi)
    out["instances"] = [
        {
            "sop_instance_uid": i.sop_instance_uid,
            "sop_class_uid": i.sop_class_uid,
            "modality": i.modality,
            "view": i.view,
            "usable": i.usable,
            "reason": i.reason,
            "faces_expected_way": i.faces_expected,
            "transfer_syntax_uid": i.transfer_syntax_uid,
            "path": i.path,
            "size": i.size,
            "received_at": iso(i.received_at),
            "revisions": i.revisions,
            "rule": i.rule,
            "held": i.held,
        }
        for i in study.instances
    ]
    out["jobs"] = [
        {
            "id": j.id,
            "state": j.state,
            "attempts": j.attempts,
            "worker_id": j.worker_id,
            "created_at": iso(j.created_at),
            "started_at": iso(j.started_at),
            "finished_at": iso(j.finished_at),
            "last_error": j.last_error,
            "stage": j.stage if j.state == JobState.RUNNING else None,
            "timings_s": j.timings,
        }
        for j in session.execute(select(Job).where(Job.study_id == study.id).order_by(Job.id)).scalars()
    ]
    latest = (
        session.execute(
            select(Job).where(Job.study_id == study.id, Job.state == JobState.DONE).order_by(Job.finished_at.desc())
        )
        .scalars()
        .first()
    )
    if latest is not None and latest.result:
        out["result"] = {
            k: latest.result.get(k)
            for k in ("cancer", "density", "images", "models", "skipped", "test_weights", "device")
        }
    results = []
    for r in session.execute(
        select(ResultObject).where(ResultObject.study_id == study.id).order_by(ResultObject.id)
    ).scalars():
        deliveries = [
            {
                "destination": d.destination,
                "state": shown_state(d),  # committing / committed / commit-timeout for delivered
                "commitment": d.commitment,  # storage commitment (db.commitment); None: not asked
                "transaction_uid": d.commit_uid,
                "committed_at": iso(d.committed_at),
                "attempts": d.attempts,
                "next_attempt_at": iso(d.next_attempt_at),
                "last_error": d.last_error,
                "last_status": d.last_status,
                "delivered_at": iso(d.delivered_at),
            }
            for d in session.execute(select(Delivery).where(Delivery.result_id == r.id)).scalars()
        ]
        results.append(
            {
                "kind": r.kind,
                "sop_class_uid": r.sop_class_uid,
                "sop_instance_uid": r.sop_instance_uid,
                "path": r.path,
                "current": (
                    r.version_key == study.result_version
                    if study.result_version
                    else r.selection_key == study.selection_key
                ),
                "version_key": r.version_key,
                "deliveries": deliveries,
            }
        )
    out["results"] = results
    return out


def failing(session: Session, limit: int = 10) -> dict:
    """What is failing now, as opposed to the error history (``errors``): per destination, the
    deliveries that gave up or are being retried after an error; and the failed studies with
    their last job error. A delivery that later succeeded is not here."""
    destinations = []
    rows = session.execute(
        select(Delivery, ResultObject.study_id)
        .join(ResultObject, Delivery.result_id == ResultObject.id)
        .where(
            (Delivery.state == DeliveryState.FAILED)
            | (Delivery.state.in_([DeliveryState.PENDING, DeliveryState.SENDING]) & Delivery.last_error.is_not(None))
        )
        .order_by(Delivery.destination, Delivery.next_attempt_at)
    ).all()
    by_destination: dict[str, list[tuple[Delivery, int]]] = {}
    for delivery, study_id in rows:
        by_destination.setdefault(delivery.destination, []).append((delivery, study_id))
    for name, items in by_destination.items():
        gave_up = [d for d, _ in items if d.state == DeliveryState.FAILED]
        retrying = [d for d, _ in items if d.state != DeliveryState.FAILED]
        newest = max((d for d, _ in items), key=lambda d: d.claimed_at or d.created_at)
        destinations.append(
            {
                "destination": name,
                "failed": len(gave_up),
                "retrying": len(retrying),
                "studies": len({study_id for _, study_id in items}),
                "last_error": newest.last_error,
                "next_attempt_at": iso(min(d.next_attempt_at for d in retrying)) if retrying else None,
            }
        )
    failed_studies = []
    for study in session.execute(
        select(Study).where(Study.state == StudyState.FAILED).order_by(Study.updated_at.desc()).limit(limit)
    ).scalars():
        job = session.execute(
            select(Job).where(Job.study_id == study.id).order_by(Job.id.desc()).limit(1)
        ).scalar_one_or_none()
        failed_studies.append(
            {
                "study_instance_uid": study.study_instance_uid,
                "since": iso(study.updated_at),
                "error": job.last_error if job is not None else None,
            }
        )
    return {
        "deliveries": destinations,
        "studies": failed_studies,
        "commitments": commit_timeouts(session),
        "notifications": failing_hooks(session),
    }


def failing_hooks(session: Session) -> list[dict]:
    """Per webhook, the events being retried after an error, and those given up since the
    hook last took one (a hook that answers again is no longer failing; its sends given up
    stay listed by ``notifications``). Sends a removed hook left are not failures."""
    last_taken = dict(
        session.execute(
            select(NotifyDelivery.hook, func.max(NotifyDelivery.delivered_at))
            .where(NotifyDelivery.state == DeliveryState.DELIVERED)
            .group_by(NotifyDelivery.hook)
        ).all()
    )
    rows = (
        session.execute(
            select(NotifyDelivery)
            .where(
                ((NotifyDelivery.state == DeliveryState.FAILED) & (NotifyDelivery.last_error != HOOK_REMOVED))
                | (NotifyDelivery.state.in_(WAITING) & NotifyDelivery.last_error.is_not(None))
            )
            .order_by(NotifyDelivery.hook, NotifyDelivery.next_attempt_at)
        )
        .scalars()
        .all()
    )
    by_hook: dict[str, list[NotifyDelivery]] = {}
    for row in rows:
        taken = last_taken.get(row.hook)
        if row.state == DeliveryState.FAILED and taken is not None and (row.claimed_at or row.created_at) < taken:
            continue
        by_hook.setdefault(row.hook, []).append(row)
    out = []
    for hook, items in by_hook.items():
        retrying = [d for d in items if d.state != DeliveryState.FAILED]
        newest = max(items, key=lambda d: d.claimed_at or d.created_at)
        out.append(
            {
                "hook": hook,
                "failed": len(items) - len(retrying),
                "retrying": len(retrying),
                "last_error": newest.last_error,
                "next_attempt_at": iso(min(d.next_attempt_at for d in retrying)) if retrying else None,
            }
        )
    return out


def notifications(session: Session, hook: str | None = None, state: str | None = None, limit: int = 50) -> list[dict]:
    """The newest webhook sends (one per event and hook), newest event first."""
    query = select(NotifyDelivery, NotifyEvent).join(NotifyEvent, NotifyDelivery.event_id == NotifyEvent.id)
    if hook is not None:
        query = query.where(NotifyDelivery.hook == hook)
    if state is not None:
        query = query.where(NotifyDelivery.state == state)
    rows = session.execute(query.order_by(NotifyEvent.at.desc(), NotifyDelivery.id.desc()).limit(limit)).all()
    return [
        {
            "hook": d.hook,
            "event": e.kind,
            "event_id": e.uid,
            "occurred_at": iso(e.at),
            "study_instance_uid": e.study_instance_uid,
            "state": d.state,
            "attempts": d.attempts,
            "last_status": d.last_status,
            "last_error": d.last_error,
            "next_attempt_at": iso(d.next_attempt_at)
            if d.state in (DeliveryState.PENDING, DeliveryState.SENDING)
            else None,
            "delivered_at": iso(d.delivered_at),
        }
        for d, e in rows
    ]


WAITING = (DeliveryState.PENDING, DeliveryState.SENDING)


def commit_timeouts(session: Session) -> list[dict]:
    """Per destination, the delivered objects whose storage commitment report never came
    (``commit-timeout``): the PACS has not confirmed it keeps them."""
    rows = session.execute(
        select(Delivery, ResultObject.study_id)
        .join(ResultObject, Delivery.result_id == ResultObject.id)
        .where(Delivery.state == DeliveryState.DELIVERED, Delivery.commitment == CommitmentState.TIMEOUT)
        .order_by(Delivery.destination)
    ).all()
    by_destination: dict[str, list[tuple[Delivery, int]]] = {}
    for delivery, study_id in rows:
        by_destination.setdefault(delivery.destination, []).append((delivery, study_id))
    return [
        {
            "destination": name,
            "timeouts": len(items),
            "studies": len({study_id for _, study_id in items}),
            "last_error": items[-1][0].last_error,
        }
        for name, items in by_destination.items()
    ]


def status(
    session: Session,
    quiet_period_s: float,
    stale_after_s: float,
    errors: int = 5,
    quarantined_files: int | None = None,
) -> dict:
    """The queue overview. ``quarantined_files`` (files under the storage directory's
    ``quarantine/``) is counted by the caller, since nothing here touches files; None where
    it was not counted."""
    studies = {state: 0 for state in StudyState.ALL}
    for state, count in session.execute(select(Study.state, func.count()).group_by(Study.state)):
        studies[state] = count
    # "ready" is derived: receiving studies complete and quiet, waiting for the next tick.
    for study in session.execute(select(Study).where(Study.state == StudyState.RECEIVING)).scalars():
        if is_ready(study, quiet_period_s):
            studies[StudyState.RECEIVING] -= 1
            studies[StudyState.READY] += 1
    jobs = {state: 0 for state in JobState.ALL}
    for state, count in session.execute(select(Job.state, func.count()).group_by(Job.state)):
        jobs[state] = count
    deliveries = {state: 0 for state in DeliveryState.ALL}
    for state, count in session.execute(select(Delivery.state, func.count()).group_by(Delivery.state)):
        deliveries[state] = count
    hooks = {state: 0 for state in (*WAITING, DeliveryState.DELIVERED, DeliveryState.FAILED)}
    for state, count in session.execute(select(NotifyDelivery.state, func.count()).group_by(NotifyDelivery.state)):
        hooks[state] = count
    # Storage commitment of delivered objects (counted within "delivered" above).
    commitments = {state: 0 for state in CommitmentState.ALL}
    for state, count in session.execute(
        select(Delivery.commitment, func.count())
        .where(Delivery.state == DeliveryState.DELIVERED, Delivery.commitment.is_not(None))
        .group_by(Delivery.commitment)
    ):
        commitments[state] = count
    now = utcnow()
    workers = [
        {
            "id": w.id,
            "hostname": w.hostname,
            "pid": w.pid,
            "device": w.device,
            "last_heartbeat": iso(w.heartbeat_at),
            "alive": w.stopped_at is None and (now - w.heartbeat_at).total_seconds() < stale_after_s,
        }
        for w in session.execute(select(Worker).order_by(Worker.heartbeat_at.desc())).scalars()
    ]
    oldest = (
        session.execute(
            select(Study)
            .where(Study.state.in_([StudyState.RECEIVING, StudyState.QUEUED, StudyState.RUNNING]))
            .order_by(Study.received_at)
        )
        .scalars()
        .first()
    )
    recent = [
        {
            "at": iso(e.at),
            "level": e.level,
            "kind": e.kind,
            "study_instance_uid": e.study_instance_uid,
            "message": e.message,
        }
        for e in session.execute(
            select(Event)
            .where(Event.level.in_(["WARNING", "ERROR"]))
            .order_by(Event.at.desc(), Event.id.desc())
            .limit(errors)
        ).scalars()
    ]
    running = [
        {
            "job": job.id,
            "study_instance_uid": uid,
            "stage": job.stage,
            "started_at": iso(job.started_at),
            "worker_id": job.worker_id,
        }
        for job, uid in session.execute(
            select(Job, Study.study_instance_uid)
            .join(Study, Job.study_id == Study.id)
            .where(Job.state == JobState.RUNNING)
            .order_by(Job.started_at)
        )
    ]
    return {
        "studies": studies,
        "jobs": jobs,
        "running": running,
        "deliveries": deliveries,
        "commitments": commitments,
        "notifications": hooks,
        "failing": failing(session),
        "workers": workers,
        "oldest_waiting": None
        if oldest is None
        else {
            "study_instance_uid": oldest.study_instance_uid,
            "state": oldest.state,
            "received_at": iso(oldest.received_at),
        },
        "errors": recent,
        "quarantined_files": quarantined_files,
        "quarantined_instances": other_patient_count(session),
    }


def held_instance_uids(session: Session, sop_instance_uids: list[str]) -> set[str]:
    """Which of these SOP Instance UIDs the node already holds (``mammonode pull`` fetches
    only the others). Asked in chunks: SQLite bounds the parameters of one statement."""
    held: set[str] = set()
    for start in range(0, len(sop_instance_uids), 500):
        chunk = sop_instance_uids[start : start + 500]
        held.update(
            session.execute(select(Instance.sop_instance_uid).where(Instance.sop_instance_uid.in_(chunk))).scalars()
        )
    return held

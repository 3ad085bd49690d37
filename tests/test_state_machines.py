"""The database state machines (jobs, outbox, study assembly) on a real SQLite database.

No node process and no network: each test gets a fresh, migrated database in its temp
directory, and time is passed in explicitly (``now=``) instead of slept through.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import shutil
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from mammonode.db import admin
from mammonode.db.assembly import enqueue, is_ready, missing_views, tick
from mammonode.db.jobs import claim, fail, finish, heartbeat, recover_stale, register_worker, release, set_stage
from mammonode.db.migrate import upgrade
from mammonode.db.models import Delivery, Event, Instance, Job, ResultObject, Study, Worker, utcnow
from mammonode.db.outbox import (
    CLAIM_TIMEOUT_S,
    Attempt,
    Claimer,
    NewResult,
    backoff_seconds,
    claim_due,
    record_attempts,
    register_results,
    release_dead_claims,
    reset_for_retry,
)
from mammonode.db.records import InstanceMeta, mark_unusable, record_instance, selection
from mammonode.db.session import Database

VIEWS = ("L-CC", "R-CC", "L-MLO", "R-MLO")
MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
ROOT = "1.2.826.0.1.3680043.10.999"

QUIET_S, INCOMPLETE_S = 30.0, 300.0  # assembly timers
STALE_S = 60.0  # job heartbeat timeout
BACKOFF = (10.0, 60.0)  # (initial, maximum) seconds

_serial = itertools.count(1)


def seconds(n: float) -> timedelta:
    return timedelta(seconds=n)


def uid() -> str:
    return f"{ROOT}.{next(_serial)}"


@pytest.fixture(scope="module")
def migrated(tmp_path_factory) -> Path:
    """An empty database at the current schema revision, migrated once and copied per test."""
    path = tmp_path_factory.mktemp("schema") / "schema.sqlite"
    database = Database(f"sqlite:///{path}")
    upgrade(database.engine)
    database.dispose()  # the last connection closing checkpoints the WAL into the file
    return path


@pytest.fixture
def db(tmp_path, migrated):
    shutil.copyfile(migrated, tmp_path / "t.sqlite")
    database = Database(f"sqlite:///{tmp_path / 't.sqlite'}")
    yield database
    database.dispose()


def meta(study_uid: str, view: str, acquired: str = "20240102080000", usable: bool = True) -> InstanceMeta:
    sop = uid()
    return InstanceMeta(
        sop_instance_uid=sop,
        sop_class_uid=MG_FOR_PRESENTATION,
        study_instance_uid=study_uid,
        series_instance_uid=f"{study_uid}.1",
        modality="MG",
        transfer_syntax_uid=EXPLICIT_VR_LE,
        path=f"instances/{sop}.dcm",
        size=4096,
        sha256=hashlib.sha256(sop.encode()).hexdigest(),
        view=view,
        usable=usable,
        reason=None if usable else "not for presentation",
        mirrored=False,
        acquired=acquired,
        calling_ae_title="MODALITY",
        patient_id="PID1",
        patient_name="Test^Patient",
        accession_number="ACC1",
        study_date="20240102",
    )


def receive(db: Database, study_uid: str, views=VIEWS, **kwargs) -> int:
    """Record one instance per view; returns the study's id."""
    with db.session() as s:
        for view in views:
            record_instance(s, meta(study_uid, view, **kwargs))
    return study(db, study_uid).id


def study(db: Database, study_uid: str) -> Study:
    with db.session() as s:
        return s.execute(select(Study).where(Study.study_instance_uid == study_uid)).scalar_one()


def get(db: Database, model, key):
    with db.session() as s:
        return s.get(model, key)


def jobs_of(db: Database, study_id: int) -> list[Job]:
    with db.session() as s:
        return list(s.execute(select(Job).where(Job.study_id == study_id).order_by(Job.id)).scalars())


def events(db: Database, kind: str) -> list[Event]:
    with db.session() as s:
        return list(s.execute(select(Event).where(Event.kind == kind)).scalars())


def queue_study(db: Database, study_uid: str) -> tuple[int, int]:
    """A complete study, queued by a tick after its quiet period; returns (study id, job id)."""
    study_id = receive(db, study_uid)
    with db.session() as s:
        quiet = s.get(Study, study_id).last_instance_at + seconds(QUIET_S + 1)
        assert tick(s, QUIET_S, INCOMPLETE_S, now=quiet).queued == [study_uid]
    [job] = jobs_of(db, study_id)
    return study_id, job.id


def claimed_job(db: Database, worker: str = "w1") -> tuple[int, int]:
    """A queued study whose job ``worker`` has claimed; returns (study id, job id)."""
    study_id, job_id = queue_study(db, uid())
    with db.session() as s:
        assert claim(s, worker).job_id == job_id
    return study_id, job_id


def new_results(n: int = 1) -> list[NewResult]:
    return [NewResult("sr", BASIC_TEXT_SR, sop, f"results/{sop}.dcm") for sop in (uid() for _ in range(n))]


def deliveries(db: Database, destinations=("archive", "viewer"), study_id: int | None = None) -> list[int]:
    """Delivery rows for a new result object (of a new study unless given); returns their ids."""
    study_id = study_id or receive(db, uid(), views=VIEWS[:1])
    with db.session() as s:
        [row] = register_results(s, study_id, None, "key", new_results(1), destinations)
        s.flush()
        return sorted(d.id for d in row.deliveries)


def set_state(db: Database, delivery_id: int, state: str) -> None:
    with db.session() as s:
        s.get(Delivery, delivery_id).state = state


def failure(message: str = "association rejected") -> Attempt:
    return Attempt(delivered=False, status=None, message=message)


# Jobs -------------------------------------------------------------------------------------------


def test_claim_takes_the_oldest_queued_job_and_runs_its_study(db):
    now = utcnow()
    newer, older = receive(db, uid()), receive(db, uid())
    with db.session() as s:
        enqueue(s, s.get(Study, newer), now=now)  # inserted first, but created later
        enqueue(s, s.get(Study, older), now=now - seconds(10))
    with db.session() as s:
        claimed = claim(s, "w1")
    assert claimed.study_id == older and claimed.attempt == 1
    job = get(db, Job, claimed.job_id)
    assert (job.state, job.worker_id, job.attempts) == ("running", "w1", 1)
    assert job.started_at is not None and job.heartbeat_at is not None
    assert get(db, Study, older).state == "running"
    assert get(db, Study, newer).state == "queued"


def test_a_second_claim_finds_nothing(db):
    queue_study(db, uid())
    with db.session() as s:
        assert claim(s, "w1") is not None
    with db.session() as s:
        assert claim(s, "w2") is None


def test_finish_marks_job_and_study_done(db):
    study_id, job_id = claimed_job(db)
    with db.session() as s:
        assert finish(s, job_id, "w1", timings={"total": 1.5}, result={"density": "B"}) is True
    job = get(db, Job, job_id)
    assert (job.state, job.result, job.timings) == ("done", {"density": "B"}, {"total": 1.5})
    assert job.finished_at is not None
    assert get(db, Study, study_id).state == "done"
    assert len(events(db, "job-done")) == 1


def test_finishing_keeps_the_flag_of_a_study_with_another_patients_image(db):
    study_id, job_id = claimed_job(db)
    flag = "flagged: holds images of another Patient ID (quarantined, not used)"
    with db.session() as s:
        s.get(Study, study_id).note = flag
    with db.session() as s:
        finish(s, job_id, "w1", timings={"total": 1.0}, result={})
    assert get(db, Study, study_id).note == flag


def test_fail_with_attempts_left_requeues(db):
    study_id, job_id = claimed_job(db)
    with db.session() as s:
        fail(s, job_id, "w1", "CUDA out of memory", max_attempts=3)
    job = get(db, Job, job_id)
    assert (job.state, job.worker_id, job.attempts, job.last_error) == ("queued", None, 1, "CUDA out of memory")
    assert get(db, Study, study_id).state == "queued"
    with db.session() as s:
        assert claim(s, "w2").attempt == 2


def test_fail_on_the_last_attempt_marks_failed(db):
    study_id, job_id = claimed_job(db)
    with db.session() as s:
        fail(s, job_id, "w1", "error 1", max_attempts=2)
    with db.session() as s:
        assert claim(s, "w2").attempt == 2
    with db.session() as s:
        fail(s, job_id, "w2", "error 2", max_attempts=2)
    job = get(db, Job, job_id)
    assert (job.state, job.attempts, job.last_error) == ("failed", 2, "error 2")
    assert job.finished_at is not None
    assert get(db, Study, study_id).state == "failed"
    assert "error 2" in get(db, Study, study_id).note
    assert [e.level for e in events(db, "job-failed")] == ["ERROR"]


def test_permanent_failure_fails_on_the_first_attempt(db):
    study_id, job_id = claimed_job(db)
    with db.session() as s:
        fail(s, job_id, "w1", "not a mammogram", max_attempts=5, permanent=True)
    job = get(db, Job, job_id)
    assert (job.state, job.attempts, job.last_error) == ("failed", 1, "not a mammogram")
    assert get(db, Study, study_id).state == "failed"


def test_release_requeues_without_counting_the_attempt(db):
    study_id, job_id = claimed_job(db)
    with db.session() as s:
        release(s, job_id, "w1")
    job = get(db, Job, job_id)
    assert (job.state, job.attempts, job.worker_id) == ("queued", 0, None)
    assert get(db, Study, study_id).state == "queued"
    with db.session() as s:
        assert claim(s, "w2").attempt == 1


def test_recover_stale_requeues_only_jobs_past_the_heartbeat_timeout(db):
    study_id, job_id = claimed_job(db)
    with db.session() as s:
        assert recover_stale(s, STALE_S, max_attempts=3, now=utcnow() + seconds(STALE_S / 2)) == []
    assert get(db, Job, job_id).state == "running"
    with db.session() as s:
        assert recover_stale(s, STALE_S, max_attempts=3, now=utcnow() + seconds(STALE_S + 5)) == [job_id]
    job = get(db, Job, job_id)
    assert (job.state, job.worker_id, job.attempts) == ("queued", None, 1)
    assert "stopped heartbeating" in job.last_error
    assert get(db, Study, study_id).state == "queued"


def test_recover_stale_fails_a_job_that_used_its_attempts(db):
    study_id, job_id = claimed_job(db)
    with db.session() as s:
        assert recover_stale(s, STALE_S, max_attempts=1, now=utcnow() + seconds(STALE_S + 5)) == [job_id]
    assert get(db, Job, job_id).state == "failed"
    assert get(db, Study, study_id).state == "failed"


def test_heartbeat_keeps_a_running_job_from_being_recovered(db):
    _, job_id = claimed_job(db)
    long_ago = utcnow() - seconds(10 * STALE_S)
    with db.session() as s:
        register_worker(s, "w1", "cpu")
        s.get(Job, job_id).heartbeat_at = long_ago  # a long-running job
    with db.session() as s:
        heartbeat(s, "w2", job_id)  # not w2's job: no effect
    assert get(db, Job, job_id).heartbeat_at == long_ago
    with db.session() as s:
        heartbeat(s, "w1", job_id)
    with db.session() as s:
        assert recover_stale(s, STALE_S, max_attempts=3, now=utcnow()) == []
    assert get(db, Job, job_id).state == "running"
    assert get(db, Worker, "w1").stopped_at is None


def test_a_worker_that_lost_its_job_cannot_finish_or_fail_it(db):
    study_id, job_id = claimed_job(db)
    with db.session() as s:  # w1 presumed dead: the job goes back to the queue and w2 takes it
        recover_stale(s, STALE_S, max_attempts=3, now=utcnow() + seconds(STALE_S + 5))
    with db.session() as s:
        assert finish(s, job_id, "w1", timings={}, result={}) is False
    assert get(db, Job, job_id).state == "queued"
    with db.session() as s:
        claim(s, "w2")
    with db.session() as s:
        assert finish(s, job_id, "w1", timings={}, result={}) is False
        fail(s, job_id, "w1", "late error", max_attempts=1)
        release(s, job_id, "w1")
    job = get(db, Job, job_id)
    assert (job.state, job.worker_id, job.attempts) == ("running", "w2", 2)
    assert get(db, Study, study_id).state == "running"


# Outbox -----------------------------------------------------------------------------------------


def test_register_results_makes_one_pending_delivery_per_destination_once(db):
    study_id = receive(db, uid(), views=VIEWS[:1])
    results = new_results(2)
    for _ in range(2):
        with db.session() as s:
            register_results(s, study_id, None, "key", results, ["archive", "viewer"])
    with db.session() as s:
        assert len(s.execute(select(ResultObject)).all()) == 2
        rows = list(s.execute(select(Delivery)).scalars())
    assert sorted(d.destination for d in rows) == ["archive", "archive", "viewer", "viewer"]
    assert {(d.state, d.attempts) for d in rows} == {("pending", 0)}


def test_claim_due_takes_only_due_rows_and_marks_them_sending(db):
    now = utcnow()
    due, later = deliveries(db)
    with db.session() as s:
        s.get(Delivery, due).next_attempt_at = now - seconds(1)
        s.get(Delivery, later).next_attempt_at = now + seconds(1)
    with db.session() as s:
        assert [c.delivery_id for c in claim_due(s, "sender", now=now)] == [due]
    row = get(db, Delivery, due)
    assert (row.state, row.claimed_by, row.claimed_at) == ("sending", "sender", now)
    assert get(db, Delivery, later).state == "pending"
    with db.session() as s:
        assert claim_due(s, "other", now=now) == []
    with db.session() as s:
        assert [c.delivery_id for c in claim_due(s, "other", now=now + seconds(1))] == [later]


def test_claim_due_takes_the_oldest_due_rows_first_up_to_the_limit(db):
    now = utcnow()
    first, second, third = deliveries(db, destinations=["a", "b", "c"])
    for row_id, due in ((first, now - seconds(30)), (second, now - seconds(10)), (third, now - seconds(20))):
        with db.session() as s:
            s.get(Delivery, row_id).next_attempt_at = due
    with db.session() as s:
        assert [c.delivery_id for c in claim_due(s, "sender", limit=2, now=now)] == [first, third]
    assert get(db, Delivery, second).state == "pending"


def test_a_row_left_sending_is_reclaimed_after_the_claim_timeout(db):
    [row_id] = deliveries(db, destinations=["archive"])
    now = utcnow()
    with db.session() as s:
        assert len(claim_due(s, "dead", now=now)) == 1
    with db.session() as s:
        assert claim_due(s, "alive", now=now + seconds(CLAIM_TIMEOUT_S - 1)) == []
    with db.session() as s:
        assert [c.delivery_id for c in claim_due(s, "alive", now=now + seconds(CLAIM_TIMEOUT_S + 1))] == [row_id]
    row = get(db, Delivery, row_id)
    assert (row.state, row.claimed_by) == ("sending", "alive")


def test_claim_due_takes_only_its_destinations_rows(db):
    first = dict(zip(["archive", "hung", "viewer"], deliveries(db, destinations=["archive", "hung", "viewer"])))
    second = dict(zip(["archive", "hung", "viewer"], deliveries(db, destinations=["archive", "hung", "viewer"])))
    now = utcnow()
    with db.session() as s:
        hung = claim_due(s, "sender-hung", now=now, destinations=["hung"])
    assert sorted(c.delivery_id for c in hung) == [first["hung"], second["hung"]]
    assert {c.destination for c in hung} == {"hung"}
    with db.session() as s:  # the others' rows are untouched, and still due
        assert get(db, Delivery, first["archive"]).state == "pending"
        archive = claim_due(s, "sender-archive", now=now, destinations=["archive"])
    assert sorted(c.delivery_id for c in archive) == [first["archive"], second["archive"]]
    with db.session() as s:  # "viewer" is no longer configured: only the catch-all sender takes it
        assert claim_due(s, "sender-archive", now=now, destinations=["archive"]) == []
        rest = claim_due(s, "sender-unconfigured", now=now, excluding=["archive", "hung"])
    assert sorted(c.delivery_id for c in rest) == [first["viewer"], second["viewer"]]


def test_claimer_names_host_and_process_and_fits_the_column():
    host = "node-1." + "h" * 57  # 64 characters, the longest a sender uses
    claimer = Claimer(host, 4242, "a1b2c3d4", "sender-" + "p" * 64)
    text = str(claimer)
    assert text.startswith(f"{host}:4242:a1b2c3d4:sender-pp") and len(text) == 128
    parsed = Claimer.parse(text)
    assert (parsed.host, parsed.pid, parsed.token) == (host, 4242, "a1b2c3d4")
    assert Claimer.parse("node-1:sender") is None and Claimer.parse(None) is None  # older forms


def test_rows_of_a_dead_claimer_on_this_host_are_released_at_once(db):
    dead = Claimer("here", 111, "old", "sender-archive")
    alive = Claimer("here", 222, "now", "sender-viewer")
    elsewhere = Claimer("there", 111, "old", "sender-archive")
    rows = {}
    for who, name in ((dead, "archive"), (alive, "viewer"), (elsewhere, "archive"), ("here:sender", "archive")):
        [row_id] = deliveries(db, destinations=[name])
        with db.session() as s:
            assert [c.delivery_id for c in claim_due(s, str(who), destinations=[name])] == [row_id]
        rows[str(who)] = row_id
    asked = []

    def is_alive(who: Claimer) -> bool:
        asked.append(who)
        return who.pid == alive.pid

    with db.session() as s:
        assert release_dead_claims(s, "here", is_alive) == 1
    assert sorted(asked, key=str) == sorted([dead, alive], key=str)  # only this host's claimers, each once
    released = get(db, Delivery, rows[str(dead)])
    assert (released.state, released.claimed_by) == ("pending", None)
    for other in (alive, elsewhere, "here:sender"):  # alive, another host, or unknown: the timeout decides
        assert get(db, Delivery, rows[str(other)]).state == "sending"
    with db.session() as s:  # released rows are due at once, their attempts not counted
        [again] = claim_due(s, "sender-archive", destinations=["archive"])
    assert again.delivery_id == rows[str(dead)] and get(db, Delivery, again.delivery_id).attempts == 0


def test_a_delivered_attempt_marks_the_row_delivered(db):
    [row_id] = deliveries(db, destinations=["archive"])
    now = utcnow()
    with db.session() as s:
        claim_due(s, "sender", now=now)
    with db.session() as s:
        record_attempts(s, "archive", {row_id: Attempt(True, 0, "ok")}, {}, max_attempts=3, backoff=BACKOFF, now=now)
    row = get(db, Delivery, row_id)
    assert (row.state, row.attempts, row.delivered_at, row.claimed_by) == ("delivered", 1, now, None)


def test_failed_attempts_back_off_exponentially_up_to_the_maximum(db):
    [row_id] = deliveries(db, destinations=["archive"])
    initial, maximum = 10.0, 30.0
    now = utcnow()
    # attempt 1 -> initial, 2 -> 2x initial, 3 -> 4x initial but capped at the maximum
    for attempt, expected in ((1, initial), (2, 2 * initial), (3, maximum)):
        with db.session() as s:
            assert len(claim_due(s, "sender", now=now)) == 1
        with db.session() as s:
            record_attempts(s, "archive", {row_id: failure()}, {}, 5, (initial, maximum), now=now)
        row = get(db, Delivery, row_id)
        assert (row.state, row.attempts, row.last_error) == ("pending", attempt, "association rejected")
        wait = (row.next_attempt_at - now).total_seconds()
        assert 0.8 * expected - 1e-3 <= wait <= 1.2 * expected + 1e-3, (attempt, wait)
        with db.session() as s:  # not due before its time
            assert claim_due(s, "sender", now=row.next_attempt_at - seconds(0.001)) == []
        now = row.next_attempt_at
    assert len(events(db, "delivery-retry")) == 3


def test_the_last_failed_attempt_marks_the_row_failed(db):
    [row_id] = deliveries(db, destinations=["archive"])
    study_uid = "1.2.3.study"
    now = utcnow()
    for _ in range(3):
        with db.session() as s:
            record_attempts(s, "archive", {row_id: failure("refused")}, {row_id: study_uid}, 3, BACKOFF, now=now)
    row = get(db, Delivery, row_id)
    assert (row.state, row.attempts, row.last_error) == ("failed", 3, "refused")
    [event] = events(db, "delivery-failed")
    assert (event.level, event.study_instance_uid) == ("ERROR", study_uid)
    with db.session() as s:
        assert claim_due(s, "sender", now=now + seconds(3600)) == []


def test_backoff_seconds_stays_within_the_jitter_of_the_schedule():
    rng = random.Random(1234)
    initial, maximum = 5.0, 120.0
    schedule = {1: 5.0, 2: 10.0, 3: 20.0, 4: 40.0, 5: 80.0, 6: 120.0, 7: 120.0, 12: 120.0}
    for attempts, base in schedule.items():
        draws = [backoff_seconds(attempts, initial, maximum, rng) for _ in range(200)]
        assert all(0.8 * base <= d <= 1.2 * base for d in draws), attempts
        assert min(draws) < 0.9 * base and max(draws) > 1.1 * base  # it does jitter
    assert backoff_seconds(3, initial, maximum, random.Random(7)) == backoff_seconds(
        3, initial, maximum, random.Random(7)
    )


def test_reset_for_retry_makes_failed_rows_pending_and_delivered_ones_only_when_asked(db):
    study_id = receive(db, uid(), views=VIEWS[:1])
    failed, delivered, pending = deliveries(db, destinations=["a", "b", "c"], study_id=study_id)
    [elsewhere] = deliveries(db, destinations=["a"])  # another study's failed row stays failed
    for row_id, state in ((failed, "failed"), (delivered, "delivered"), (elsewhere, "failed")):
        set_state(db, row_id, state)
    with db.session() as s:
        s.get(Delivery, failed).attempts = 5
    with db.session() as s:
        assert reset_for_retry(s, s.get(Study, study_id), include_delivered=False) == 1
    assert [get(db, Delivery, i).state for i in (failed, delivered, pending)] == ["pending", "delivered", "pending"]
    assert get(db, Delivery, failed).attempts == 0
    assert get(db, Delivery, elsewhere).state == "failed"
    with db.session() as s:
        assert reset_for_retry(s, s.get(Study, study_id), include_delivered=True) == 1
    assert {get(db, Delivery, i).state for i in (failed, delivered, pending)} == {"pending"}


# Assembly ---------------------------------------------------------------------------------------


def test_a_complete_study_is_queued_only_after_the_quiet_period(db):
    study_uid = uid()
    study_id = receive(db, study_uid)
    last = study(db, study_uid).last_instance_at
    with db.session() as s:
        assert tick(s, QUIET_S, INCOMPLETE_S, now=last + seconds(QUIET_S - 1)).queued == []
        assert not is_ready(s.get(Study, study_id), QUIET_S, now=last + seconds(QUIET_S - 1))
    assert study(db, study_uid).state == "receiving" and jobs_of(db, study_id) == []
    with db.session() as s:
        assert is_ready(s.get(Study, study_id), QUIET_S, now=last + seconds(QUIET_S + 1))
        assert tick(s, QUIET_S, INCOMPLETE_S, now=last + seconds(QUIET_S + 1)).queued == [study_uid]
    [job] = jobs_of(db, study_id)
    assert job.state == "queued"
    assert study(db, study_uid).state == "queued"
    assert job.selection_key == study(db, study_uid).selection_key


def test_a_study_missing_views_becomes_incomplete_after_the_timeout(db):
    study_uid = uid()
    study_id = receive(db, study_uid, views=("L-CC", "R-CC"))
    last = study(db, study_uid).last_instance_at
    with db.session() as s:
        assert missing_views(s.get(Study, study_id).instances) == ["L-MLO", "R-MLO"]
        result = tick(s, QUIET_S, INCOMPLETE_S, now=last + seconds(INCOMPLETE_S - 1))
    assert (result.queued, result.incomplete) == ([], [])
    assert study(db, study_uid).state == "receiving"
    with db.session() as s:
        result = tick(s, QUIET_S, INCOMPLETE_S, now=last + seconds(INCOMPLETE_S + 1))
    assert (result.queued, result.incomplete) == ([], [study_uid])
    done = study(db, study_uid)
    assert (done.state, done.note) == ("incomplete", "missing views: L-MLO, R-MLO")
    assert jobs_of(db, study_id) == []
    assert [e.level for e in events(db, "study-incomplete")] == ["WARNING"]


def test_a_late_view_brings_an_incomplete_study_back_to_receiving(db):
    study_uid = uid()
    receive(db, study_uid, views=VIEWS[:3])
    with db.session() as s:
        tick(s, QUIET_S, INCOMPLETE_S, now=utcnow() + seconds(INCOMPLETE_S + 1))
    assert study(db, study_uid).state == "incomplete"
    receive(db, study_uid, views=VIEWS[3:])
    assert study(db, study_uid).state == "receiving"


def test_a_new_instance_supersedes_the_queued_job_and_the_study_is_queued_again(db):
    study_uid = uid()
    study_id, first_job = queue_study(db, study_uid)
    before = study(db, study_uid)
    receive(db, study_uid, views=["L-CC"], acquired="20240102081500")  # a retake
    after = study(db, study_uid)
    assert after.state == "receiving" and after.version == before.version + 1
    assert after.selection_key != before.selection_key
    assert get(db, Job, first_job).state == "superseded"
    with db.session() as s:
        tick(s, QUIET_S, INCOMPLETE_S, now=after.last_instance_at + seconds(QUIET_S + 1))
    [old, new] = jobs_of(db, study_id)
    assert (old.state, new.state) == ("superseded", "queued")
    assert new.selection_key == after.selection_key
    with db.session() as s:
        assert claim(s, "w1").job_id == new.id


def test_new_input_during_a_run_leaves_the_study_for_the_new_inputs(db):
    study_uid = uid()
    study_id, job_id = queue_study(db, study_uid)
    with db.session() as s:
        claim(s, "w1")
    receive(db, study_uid, views=["R-MLO"], acquired="20240102090000")
    with db.session() as s:
        assert finish(s, job_id, "w1", timings={}, result={}) is True
    assert get(db, Job, job_id).state == "done"
    assert study(db, study_uid).state == "receiving"  # the new inputs still have to run


def test_mark_unusable_takes_the_view_out_of_the_selection(db):
    study_uid = uid()
    study_id, job_id = queue_study(db, study_uid)
    with db.session() as s:
        mark_unusable(s, study_id, "L-MLO", "pectoral muscle not found")
    with db.session() as s:
        the_study = s.get(Study, study_id)
        assert "L-MLO" not in selection(the_study.instances)
        assert missing_views(the_study.instances) == ["L-MLO"]
        [lmlo] = [i for i in the_study.instances if i.view == "L-MLO"]
        assert lmlo.usable is False and "pectoral muscle not found" in lmlo.reason
        assert the_study.state == "receiving"
    assert get(db, Job, job_id).state == "superseded"
    assert [e.level for e in events(db, "instance-unusable")] == ["ERROR"]


def test_mark_unusable_falls_back_to_the_other_image_of_the_view(db):
    study_uid = uid()
    study_id = receive(db, study_uid)
    receive(db, study_uid, views=["L-CC"], acquired="20240102081500")
    with db.session() as s:
        the_study = s.get(Study, study_id)
        retake = selection(the_study.instances)["L-CC"]
        assert retake.acquired == "20240102081500"
        mark_unusable(s, study_id, "L-CC", "unreadable")
    with db.session() as s:
        chosen = selection(s.get(Study, study_id).instances)
        assert set(chosen) == set(VIEWS)
        assert chosen["L-CC"].acquired == "20240102080000"
        assert s.get(Instance, retake.id).usable is False


# Admin ------------------------------------------------------------------------------------------


def test_admin_retry_requeues_a_failed_study_and_refuses_an_incomplete_one(db):
    study_id, job_id = claimed_job(db)
    with db.session() as s:
        fail(s, job_id, "w1", "boom", max_attempts=1)
    with db.session() as s:
        outcome = admin.retry(s, s.get(Study, study_id))
    assert outcome["job_queued"] is True
    assert get(db, Study, study_id).state == "queued"
    assert [j.state for j in jobs_of(db, study_id)] == ["failed", "queued"]

    partial = uid()
    receive(db, partial, views=VIEWS[:2])
    with db.session() as s:
        tick(s, QUIET_S, INCOMPLETE_S, now=utcnow() + seconds(INCOMPLETE_S + 1))
    with db.session() as s, pytest.raises(ValueError, match="L-MLO, R-MLO"):
        admin.retry(s, s.get(Study, study(db, partial).id), force=True)


def test_purgeable_keeps_back_studies_with_pending_deliveries(db):
    study_id, job_id = claimed_job(db)
    with db.session() as s:
        finish(s, job_id, "w1", timings={}, result={})
        register_results(s, study_id, job_id, "key", new_results(1), ["archive"])
    with db.session() as s:
        removable, kept = admin.purgeable(s, older_than_days=0)
    assert (removable, kept) == ([], 1)
    with db.session() as s:
        for row in s.execute(select(Delivery)).scalars():
            row.state = "delivered"
    with db.session() as s:
        removable, kept = admin.purgeable(s, older_than_days=0)
        assert ([r.id for r in removable], kept) == ([study_id], 0)
    with db.session() as s:
        assert admin.purgeable(s, older_than_days=1) == ([], 0)


def test_status_separates_what_fails_now_from_the_error_history(db):
    """A delivery that failed and then went through leaves the history but not ``failing``;
    one still being retried and one that gave up are listed per destination."""
    from mammonode.db.queries import status

    healed, retrying = deliveries(db, ("archive", "viewer"))
    [gave_up] = deliveries(db, ("archive",))
    study_of = {healed: "s1", retrying: "s1", gave_up: "s2"}
    with db.session() as s:
        record_attempts(s, "archive", {healed: failure("refused"), gave_up: failure("refused")}, study_of, 2, (1, 1))
        record_attempts(s, "viewer", {retrying: failure("timed out")}, study_of, 5, (1, 1))
    with db.session() as s:
        record_attempts(
            s, "archive", {healed: Attempt(True, 0, "stored"), gave_up: failure("refused")}, study_of, 2, (1, 1)
        )
    with db.session() as s:
        data = status(s, QUIET_S, 60)
    assert len(data["errors"]) == 4, "the history keeps every warning and error"
    now = {d["destination"]: d for d in data["failing"]["deliveries"]}
    assert now["archive"]["failed"] == 1 and now["archive"]["retrying"] == 0 and now["archive"]["studies"] == 1
    assert now["viewer"]["retrying"] == 1 and now["viewer"]["last_error"] == "timed out"
    assert now["viewer"]["next_attempt_at"] is not None
    with db.session() as s:
        record_attempts(s, "viewer", {retrying: Attempt(True, 0, "stored")}, study_of, 5, (1, 1))
    with db.session() as s:
        assert [d["destination"] for d in status(s, QUIET_S, 60)["failing"]["deliveries"]] == ["archive"]


def test_a_running_jobs_stage_is_shown_until_it_ends(db):
    from mammonode.db.queries import status, study_detail

    study_id, job_id = claimed_job(db, "w1")
    with db.session() as s:
        set_stage(s, job_id, "someone-else", "crop")  # not this worker's job: ignored
        set_stage(s, job_id, "w1", "heatmaps")
    with db.session() as s:
        [running] = status(s, QUIET_S, 60)["running"]
        assert running["job"] == job_id and running["stage"] == "heatmaps"
        [job] = study_detail(s, s.get(Study, study_id), QUIET_S)["jobs"]
        assert job["stage"] == "heatmaps"
    with db.session() as s:
        assert finish(s, job_id, "w1", {}, {})
    with db.session() as s:
        assert status(s, QUIET_S, 60)["running"] == []
        [job] = study_detail(s, s.get(Study, study_id), QUIET_S)["jobs"]
        assert job["state"] == "done" and job["stage"] is None

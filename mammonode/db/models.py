"""The node's tables. One schema for SQLite and PostgreSQL; Alembic owns its evolution."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    pass


class StudyState:
    RECEIVING = "receiving"
    READY = "ready"
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    INCOMPLETE = "incomplete"
    # Every instance was received under a `store` rule ([[rules]]): kept, never queued. A
    # later instance under a `process` rule makes it receiving.
    STORED = "stored"
    ALL = (RECEIVING, READY, QUEUED, RUNNING, DONE, FAILED, INCOMPLETE, STORED)


class JobState:
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SUPERSEDED = "superseded"
    ALL = (QUEUED, RUNNING, DONE, FAILED, SUPERSEDED)


class DeliveryState:
    PENDING = "pending"
    SENDING = "sending"
    DELIVERED = "delivered"
    FAILED = "failed"
    SUPERSEDED = "superseded"  # not sent: a newer result version replaced the object first
    ALL = (PENDING, SENDING, DELIVERED, FAILED, SUPERSEDED)


class CommitmentState:
    """A delivered object's storage commitment (Delivery.commitment); shown in place of
    ``delivered`` by ``mammonode study`` and the status views."""

    REQUESTED = "committing"  # N-ACTION accepted, no report yet
    COMMITTED = "committed"  # the peer's N-EVENT-REPORT lists it as committed
    TIMEOUT = "commit-timeout"  # no report within the destination's commitment_timeout_s
    ALL = (REQUESTED, COMMITTED, TIMEOUT)


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    state: Mapped[str] = mapped_column(String(16), default=StudyState.RECEIVING, index=True)
    # PHI, shown only with --show-phi and copied into result objects.
    patient_id: Mapped[str | None] = mapped_column(Text)
    patient_name: Mapped[str | None] = mapped_column(Text)
    accession_number: Mapped[str | None] = mapped_column(Text)
    study_date: Mapped[str | None] = mapped_column(Text)
    # The four chosen inputs, as "sop_uid:sha256" lines hashed; a change re-queues the study.
    selection_key: Mapped[str | None] = mapped_column(String(64))
    processed_key: Mapped[str | None] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer, default=0)
    # The result version (reporting.uids.version_key) of the newest registered results.
    result_version: Mapped[str | None] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_instance_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    note: Mapped[str | None] = mapped_column(Text)

    instances: Mapped[list[Instance]] = relationship(back_populates="study", cascade="all, delete-orphan")
    jobs: Mapped[list[Job]] = relationship(back_populates="study", cascade="all, delete-orphan")
    results: Mapped[list[ResultObject]] = relationship(back_populates="study", cascade="all, delete-orphan")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    series_instance_uid: Mapped[str | None] = mapped_column(String(64))
    modality: Mapped[str | None] = mapped_column(Text)
    transfer_syntax_uid: Mapped[str | None] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)  # relative to the storage directory
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    view: Mapped[str] = mapped_column(String(8))  # L-CC ... or "other"
    usable: Mapped[bool] = mapped_column(Boolean, default=False)
    reason: Mapped[str | None] = mapped_column(Text)
    faces_expected: Mapped[bool | None] = mapped_column(Boolean)
    acquired: Mapped[str | None] = mapped_column(Text)  # DICOM date+time, for "newest"
    calling_ae_title: Mapped[str | None] = mapped_column(Text)
    # The [[rules]] entry it was received under (None: before rules existed), and whether
    # that rule's action was `store` (kept, never pipeline input).
    rule: Mapped[str | None] = mapped_column(String(64))
    held: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    revisions: Mapped[int] = mapped_column(Integer, default=0)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    study: Mapped[Study] = relationship(back_populates="instances")


class Worker(Base):
    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    device: Mapped[str | None] = mapped_column(String(32))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    stopped_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_state_created", "state", "created_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    selection_key: Mapped[str] = mapped_column(String(64))
    study_version: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), default=JobState.QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker_id: Mapped[str | None] = mapped_column(String(128))
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    stage: Mapped[str | None] = mapped_column(String(32))  # the running job's current pipeline stage
    timings: Mapped[dict | None] = mapped_column(JSON)
    result: Mapped[dict | None] = mapped_column(JSON)

    study: Mapped[Study] = relationship(back_populates="jobs")


class ResultObject(Base):
    __tablename__ = "result_objects"
    __table_args__ = (UniqueConstraint("sop_instance_uid"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    selection_key: Mapped[str] = mapped_column(String(64))
    version_key: Mapped[str | None] = mapped_column(String(64))  # result version; None before 0002
    kind: Mapped[str] = mapped_column(String(32))  # sr, sr-comprehensive, sc-malignant-L-CC, ..., summary, kos
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    study: Mapped[Study] = relationship(back_populates="results")
    deliveries: Mapped[list[Delivery]] = relationship(back_populates="result", cascade="all, delete-orphan")


class SendState:
    """The columns of one send that is claimed, tried and retried with backoff until it is
    delivered or given up: a result object to a destination (Delivery), an event to a
    webhook (NotifyDelivery)."""

    state: Mapped[str] = mapped_column(String(16), default=DeliveryState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    last_status: Mapped[int | None] = mapped_column(Integer)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Delivery(SendState, Base):
    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("result_id", "destination"),
        Index("ix_deliveries_state_next", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("result_objects.id", ondelete="CASCADE"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    # Storage commitment (db.commitment), for destinations that ask for it: None (not asked),
    # or a CommitmentState; the Transaction UID of the latest request, kept so that a report
    # arriving late, or after a restart, is still matched.
    commitment: Mapped[str | None] = mapped_column(String(16))
    commit_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    commit_requested_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    committed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    result: Mapped[ResultObject] = relationship(back_populates="deliveries")


class Event(Base):
    """Errors and notable transitions, newest first in `status` (never PHI)."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    level: Mapped[str] = mapped_column(String(8))
    kind: Mapped[str] = mapped_column(String(32))
    study_instance_uid: Mapped[str | None] = mapped_column(String(64))
    message: Mapped[str] = mapped_column(Text)
    seconds: Mapped[float | None] = mapped_column(Float)


class Installation(Base):
    """This installation's identity as result equipment (SR Device Observer UID, Device
    Serial Number): generated once, on first use, and kept, so a PACS can tell nodes apart
    and one node's results stay attributable across restarts and upgrades."""

    __tablename__ = "installation"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_uid: Mapped[str] = mapped_column(String(64))
    serial_number: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class NotifyEvent(Base):
    """Something the [[notify]] webhooks may be told (db.notifications), written in the
    transaction of the state change it reports, so it is neither lost nor told of a change
    that was rolled back. Never PHI: patient values are looked up when a hook that includes
    them is sent the event."""

    __tablename__ = "notify_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    uid: Mapped[str] = mapped_column(String(36), unique=True)  # a UUID, the receiver's idempotency key
    kind: Mapped[str] = mapped_column(String(32))  # config.NOTIFY_EVENTS
    study_instance_uid: Mapped[str | None] = mapped_column(String(64))
    details: Mapped[dict] = mapped_column(JSON)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # When its deliveries (one per hook that wants it) were made; None: not yet.
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True)

    deliveries: Mapped[list[NotifyDelivery]] = relationship(back_populates="event", cascade="all, delete-orphan")


class NotifyDelivery(SendState, Base):
    """One event for one webhook: claimed, POSTed, retried with backoff (DeliveryState)."""

    __tablename__ = "notify_deliveries"
    __table_args__ = (
        UniqueConstraint("event_id", "hook"),
        Index("ix_notify_deliveries_hook_state_next", "hook", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    event_id: Mapped[int] = mapped_column(ForeignKey("notify_events.id", ondelete="CASCADE"), index=True)
    hook: Mapped[str] = mapped_column(String(64))

    event: Mapped[NotifyEvent] = relationship(back_populates="deliveries")

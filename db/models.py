"""SQLAlchemy 2.x models: studies, instances, jobs and audit events.

No patient name, patient ID or birth date is stored. The accession number is
kept on the study (the worklist may show it when configured) but never logged.
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from db.states import AuditAction, DeliveryKind, DeliveryState, JobState, StudyState

UID = sa.String(64)


class UTCDateTime(TypeDecorator[datetime]):
    """Stores naive UTC, returns aware UTC, on every dialect."""

    impl = sa.DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


def _enum(cls: type) -> sa.Enum:
    return sa.Enum(cls, native_enum=False, length=32, values_callable=lambda e: [m.value for m in e],
                   validate_strings=True)


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    })


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_uid: Mapped[str] = mapped_column(UID, unique=True)
    accession_number: Mapped[str | None] = mapped_column(sa.String(16))
    state: Mapped[StudyState] = mapped_column(_enum(StudyState), index=True)
    revision: Mapped[int] = mapped_column(default=1)
    """Incremented each time late instances re-open a completed study."""
    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    instances: Mapped[list[Instance]] = relationship(back_populates="study")
    jobs: Mapped[list[Job]] = relationship(back_populates="study")


class Instance(Base):
    __tablename__ = "instances"
    __table_args__ = (
        sa.UniqueConstraint("sop_instance_uid", "version"),
        sa.Index("ix_instances_current_sop_instance_uid", "sop_instance_uid", unique=True,
                 sqlite_where=sa.text("superseded_at IS NULL"),
                 postgresql_where=sa.text("superseded_at IS NULL")),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(sa.ForeignKey("studies.id"), index=True)
    series_uid: Mapped[str] = mapped_column(UID)
    sop_instance_uid: Mapped[str] = mapped_column(UID)
    """Unique among current rows (``superseded_at`` NULL) and with ``version``."""
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    modality: Mapped[str | None] = mapped_column(sa.String(16))
    body_part: Mapped[str | None] = mapped_column(sa.String(64))
    view_position: Mapped[str | None] = mapped_column(sa.String(16))
    eligible: Mapped[bool]
    eligibility_reason: Mapped[str] = mapped_column(sa.String(64))
    spool_path: Mapped[str | None] = mapped_column(sa.String(255))
    """Relative to the spool folder; NULL when the instance was discarded."""
    size_bytes: Mapped[int]
    calling_ae: Mapped[str] = mapped_column(sa.String(16))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    receive_count: Mapped[int] = mapped_column(default=1)
    study_revision: Mapped[int]
    purged_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), index=True)
    """When retention deleted the spooled file (the row stays)."""
    content_hash: Mapped[str | None] = mapped_column(sa.String(64))
    """sha256 (hex) of the data set bytes as received, without the file meta header."""
    version: Mapped[int] = mapped_column(default=1, server_default="1")
    """1 for the first copy; n+1 when a re-send with other bytes was kept beside it
    (``receiver.duplicate_policy = "replace_and_rescore"``)."""
    superseded_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    """Set when a later version replaced this one; the file and row stay."""

    study: Mapped[Study] = relationship(back_populates="instances")


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        sa.UniqueConstraint("study_id", "study_revision"),
        sa.Index("ix_jobs_state_next_attempt_at", "state", "next_attempt_at"),
        sa.Index("ix_jobs_state_lease_expires_at", "state", "lease_expires_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(sa.ForeignKey("studies.id"), index=True)
    study_revision: Mapped[int]
    state: Mapped[JobState] = mapped_column(_enum(JobState), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    attempts: Mapped[int] = mapped_column(default=0)
    lease_owner: Mapped[str | None] = mapped_column(sa.String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    """A retried job is not claimed before this time."""
    last_error: Mapped[str | None] = mapped_column(sa.Text)
    failure_reason: Mapped[str | None] = mapped_column(sa.String(64))
    """Short code of the last failure (docs/operations.md lists them), e.g. ``abandoned``."""

    study: Mapped[Study] = relationship(back_populates="jobs")


class AuditEvent(Base):
    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    action: Mapped[AuditAction] = mapped_column(_enum(AuditAction))
    actor: Mapped[str] = mapped_column(sa.String(64))
    """Calling AE title, ``scheduler``, or ``operator:<user>``."""
    study_uid: Mapped[str | None] = mapped_column(UID, index=True)
    sop_instance_uid: Mapped[str | None] = mapped_column(UID)
    detail: Mapped[str | None] = mapped_column(sa.Text)
    """Short JSON object; never patient data."""


class Result(Base):
    """One scoring of one study revision by one model; the SR built from it."""

    __tablename__ = "results"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(sa.ForeignKey("jobs.id"), unique=True)
    study_id: Mapped[int] = mapped_column(sa.ForeignKey("studies.id"), index=True)
    study_revision: Mapped[int]
    model_name: Mapped[str] = mapped_column(sa.String(64))
    model_version: Mapped[str] = mapped_column(sa.String(64))
    model_validated: Mapped[bool]
    probability: Mapped[float | None]
    """Study level: the maximum over its scored images; NULL when not analysable."""
    decision: Mapped[bool | None]
    threshold: Mapped[float]
    """The decision threshold used."""
    urgent_threshold: Mapped[float | None]
    elevated_threshold: Mapped[float | None]
    priority: Mapped[str] = mapped_column(sa.String(32), index=True)
    inference_seconds: Mapped[float | None]
    """Network time spent on this study's images (its share of the batches)."""
    sr_sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sr_series_uid: Mapped[str] = mapped_column(UID)
    sr_path: Mapped[str] = mapped_column(sa.String(255))
    summary_sop_instance_uid: Mapped[str | None] = mapped_column(UID, unique=True, index=True)
    """The summary Secondary Capture made from this result; NULL when none was made (the
    reason is in ``detail["summary"]["reason"]``)."""
    summary_path: Mapped[str | None] = mapped_column(sa.String(255))
    """Its file, relative to the spool root."""
    detail: Mapped[str] = mapped_column(sa.Text)
    """JSON: per-image probabilities and refusal reasons (SOP Instance UIDs only)."""
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class Delivery(Base):
    """One object of a result (its SR, its summary image, or its HL7 message) to one destination."""

    __tablename__ = "deliveries"
    __table_args__ = (
        sa.UniqueConstraint("result_id", "destination", "kind"),
        sa.Index("ix_deliveries_state_next_attempt_at", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    result_id: Mapped[int] = mapped_column(sa.ForeignKey("results.id"), index=True)
    destination: Mapped[str] = mapped_column(sa.String(64))
    """The ``name`` of a ``[[destinations]]`` (kind ``sr`` or ``summary``) or
    ``[[hl7_destinations]]`` (kind ``hl7``) entry."""
    kind: Mapped[DeliveryKind] = mapped_column(_enum(DeliveryKind), default=DeliveryKind.SR,
                                               server_default=DeliveryKind.SR.value)
    message_control_id: Mapped[str | None] = mapped_column(sa.String(20), unique=True)
    """MSH-10 of the HL7 message (kind ``hl7``; NULL for an SR): set when the row is made and
    kept on every attempt and resend, so the RIS can recognise a retransmission."""
    state: Mapped[DeliveryState] = mapped_column(_enum(DeliveryState), index=True)
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    last_reason: Mapped[str | None] = mapped_column(sa.String(64))
    last_detail: Mapped[str | None] = mapped_column(sa.Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

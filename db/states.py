"""State enums and the transitions allowed between them.

Every state change in the database goes through :func:`check_transition`,
called only from :mod:`db.queue`.
"""

from __future__ import annotations

import enum
from typing import Any

from db.exceptions import InvalidTransition


class StudyState(enum.StrEnum):
    RECEIVING = "receiving"
    """Instances are arriving; the study is not yet quiet."""
    COMPLETE = "complete"
    """Quiet for the configured period and holds eligible images; a job was queued."""
    IGNORED = "ignored"
    """Quiet, but none of its instances is eligible for scoring."""


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SUPERSEDED = "superseded"
    """A later revision of the study (late instances) replaced this job before it ran."""


class DeliveryState(enum.StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"
    """Gave up after the configured number of attempts; `opacityd resend` re-queues it."""


class DeliveryKind(enum.StrEnum):
    """What a delivery carries (``deliveries.kind``): one row per result, destination and kind."""

    SR = "sr"
    """The DICOM SR, by C-STORE to a ``[[destinations]]`` entry."""
    HL7 = "hl7"
    """An HL7 v2 ORU^R01 over MLLP to an ``[[hl7_destinations]]`` entry."""
    SUMMARY = "summary"
    """The summary Secondary Capture (the scored radiograph with its heatmap and the result as
    burned-in text), by C-STORE to a ``[[destinations]]`` entry whose ``send`` lists it."""


class AuditAction(enum.StrEnum):
    INSTANCE_RECEIVED = "instance_received"
    INSTANCE_DUPLICATE = "instance_duplicate"
    INSTANCE_CONFLICT = "instance_conflict"
    """A re-sent SOP Instance UID with other bytes (detail: both hashes, the policy applied)."""
    INSTANCE_REFUSED = "instance_refused"
    ASSOCIATION_REJECTED = "association_rejected"
    STUDY_COMPLETED = "study_completed"
    STUDY_IGNORED = "study_ignored"
    STUDY_REOPENED = "study_reopened"
    JOB_ENQUEUED = "job_enqueued"
    JOB_SUPERSEDED = "job_superseded"
    JOB_CLAIMED = "job_claimed"
    JOB_DONE = "job_done"
    JOB_RETRY = "job_retry"
    JOB_FAILED = "job_failed"
    JOB_REQUEUED = "job_requeued"
    RESULT_RECORDED = "result_recorded"
    DELIVERY_SENT = "delivery_sent"
    DELIVERY_RETRY = "delivery_retry"
    DELIVERY_FAILED = "delivery_failed"
    DELIVERY_REQUEUED = "delivery_requeued"
    DELIVERY_SKIPPED = "delivery_skipped"
    """A result that gets no delivery of one kind to a destination (detail: the kind, the
    destination and the reason, e.g. ``no_accession_number`` for an HL7 result)."""
    STUDY_PURGED = "study_purged"
    """Retention deleted spooled files of the study (detail: how many, why)."""
    OPERATOR_COMMAND = "operator_command"
    HEADER_SANITISED = "header_sanitised"
    """Outputs of the study were built with header values repaired or dropped (detail: the
    attribute keywords and the kind of problem, never the values)."""


STUDY_TRANSITIONS: dict[StudyState, frozenset[StudyState]] = {
    StudyState.RECEIVING: frozenset({StudyState.COMPLETE, StudyState.IGNORED}),
    StudyState.COMPLETE: frozenset({StudyState.RECEIVING}),
    StudyState.IGNORED: frozenset({StudyState.RECEIVING}),
}

JOB_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.SUPERSEDED}),
    JobState.RUNNING: frozenset({JobState.DONE, JobState.FAILED, JobState.QUEUED}),
    JobState.FAILED: frozenset({JobState.QUEUED}),
    JobState.DONE: frozenset(),
    JobState.SUPERSEDED: frozenset(),
}


DELIVERY_TRANSITIONS: dict[DeliveryState, frozenset[DeliveryState]] = {
    DeliveryState.PENDING: frozenset({DeliveryState.DELIVERED, DeliveryState.FAILED}),
    DeliveryState.FAILED: frozenset({DeliveryState.PENDING}),
    DeliveryState.DELIVERED: frozenset({DeliveryState.PENDING}),
}


def check_transition(current: enum.StrEnum, target: enum.StrEnum) -> None:
    """Raise :class:`InvalidTransition` unless ``current -> target`` is allowed."""
    tables: dict[type, dict[Any, frozenset[Any]]] = {
        StudyState: STUDY_TRANSITIONS, JobState: JOB_TRANSITIONS,
        DeliveryState: DELIVERY_TRANSITIONS,
    }
    if target not in tables[type(current)][current]:
        raise InvalidTransition(type(current).__name__, current.value, target.value)

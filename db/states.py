"""State enums and the transitions allowed between them.

Every state change in the database goes through :func:`check_transition`,
called only from :mod:`db.queue`.
"""

from __future__ import annotations

import enum

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


class AuditAction(enum.StrEnum):
    INSTANCE_RECEIVED = "instance_received"
    INSTANCE_DUPLICATE = "instance_duplicate"
    INSTANCE_REFUSED = "instance_refused"
    ASSOCIATION_REJECTED = "association_rejected"
    STUDY_COMPLETED = "study_completed"
    STUDY_IGNORED = "study_ignored"
    STUDY_REOPENED = "study_reopened"
    JOB_ENQUEUED = "job_enqueued"
    JOB_SUPERSEDED = "job_superseded"


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


def check_transition(current: enum.StrEnum, target: enum.StrEnum) -> None:
    """Raise :class:`InvalidTransition` unless ``current -> target`` is allowed."""
    table: dict = STUDY_TRANSITIONS if isinstance(current, StudyState) else JOB_TRANSITIONS
    if target not in table[current]:
        raise InvalidTransition(type(current).__name__, current.value, target.value)

"""Scoring jobs: claim under a lease, finish with a result and its deliveries, retry, requeue.

A claim is a conditional UPDATE (the job is still claimable), so two workers
never hold the same job; on PostgreSQL the candidate rows are also locked with
``FOR UPDATE SKIP LOCKED`` (see :func:`db.engine.for_claim`). A job whose
lease expired (its worker died) is claimable again, and that claim counts an
attempt; one whose worker vanished ``max_attempts`` times ends FAILED with the
reason ``abandoned`` instead (:func:`abandon_exhausted`, :func:`release_leases`).
"""

from __future__ import annotations

import enum
import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.orm import Session

from db.engine import for_claim, locks_rows
from db.models import Delivery, Instance, Job, Result, Study
from db.queue import audit, set_job_state
from db.states import AuditAction, DeliveryKind, DeliveryState, JobState


class FailureReason(enum.StrEnum):
    """Short code stored in ``jobs.failure_reason`` (docs/operations.md says what to do)."""

    DATABASE_BUSY = "database_busy"
    """The database was locked or unreachable (transient)."""
    DATABASE_ERROR = "database_error"
    """Another database error while reading inputs or recording (transient)."""
    SPOOL_UNREADABLE = "spool_unreadable"
    """An acknowledged spool file is no DICOM file any more (permanent)."""
    SPOOL_FILE_MISSING = "spool_file_missing"
    """An acknowledged spool file is gone while the spool is mounted (permanent)."""
    SPOOL_NOT_MOUNTED = "spool_not_mounted"
    """The spool is not mounted on the worker's host (transient: retried)."""
    PREPROCESS_ERROR = "preprocess_error"
    """Decoding or preprocessing an image raised unexpectedly (permanent)."""
    NO_INPUT = "no_input"
    """No eligible image of the study is held (permanent)."""
    INFERENCE_ERROR = "inference_error"
    """The network raised on one of the study's images (out of memory: transient)."""
    SR_BUILD_FAILED = "sr_build_failed"
    """The SR could not be built from the headers (permanent)."""
    SR_WRITE_FAILED = "sr_write_failed"
    """The SR file could not be written, e.g. a full disk (transient)."""
    ABANDONED = "abandoned"
    """Its worker vanished (killed, crashed) on every one of ``max_attempts`` attempts."""
    INTERNAL_ERROR = "internal_error"
    """Anything else: a bug; the traceback is in the worker's log."""


@dataclass(frozen=True)
class ClaimedJob:
    job_id: int
    study_id: int
    study_uid: str
    revision: int
    attempts: int


@dataclass(frozen=True)
class JobInput:
    sop_instance_uid: str
    spool_path: str | None
    eligible: bool
    reason: str
    content_hash: str | None
    """sha256 of the stored bytes as the receiver recorded them (None for rows older than 0004)."""


@dataclass(frozen=True)
class AbandonedJob:
    """A job failed because its worker vanished on its last allowed attempt."""

    job_id: int
    study_uid: str
    attempts: int


@dataclass(frozen=True)
class ResultRecord:
    model_name: str
    model_version: str
    model_validated: bool
    probability: float | None
    decision: bool | None
    threshold: float
    urgent_threshold: float
    elevated_threshold: float
    priority: str
    inference_seconds: float
    sr_sop_instance_uid: str
    sr_series_uid: str
    sr_path: str
    detail: dict[str, Any]
    summary_sop_instance_uid: str | None = None
    summary_path: str | None = None


def _claimable_branches(now: datetime, max_attempts: int | None = None
                        ) -> tuple[sa.ColumnElement[bool], sa.ColumnElement[bool]]:
    """(queued and due, running with an expired lease): each a range on its own index."""
    queued = sa.and_(Job.state == JobState.QUEUED,
                     sa.or_(Job.next_attempt_at.is_(None), Job.next_attempt_at <= now))
    abandoned = sa.and_(Job.state == JobState.RUNNING, Job.lease_expires_at < now)
    if max_attempts is not None:
        abandoned = sa.and_(abandoned, Job.attempts < max_attempts)
    return queued, abandoned


def _claimable(now: datetime, max_attempts: int | None = None) -> sa.ColumnElement[bool]:
    return sa.or_(*_claimable_branches(now, max_attempts))


def claim_jobs(session: Session, owner: str, lease: timedelta, now: datetime,
               limit: int, *, max_attempts: int | None = None) -> list[ClaimedJob]:
    """Claim up to ``limit`` jobs for ``owner``, oldest first.

    A job whose lease expired is claimed again (one more attempt) only while it
    has attempts left under ``max_attempts``; call :func:`abandon_exhausted` first
    so that the others end FAILED instead of staying RUNNING.
    """
    claimable = _claimable(now, max_attempts)
    # One SELECT per branch, each a search on its index ((state, next_attempt_at) and
    # (state, lease_expires_at)); as a single OR ordered by id, SQLite scans the whole table
    # (tests/test_query_plans.py). The outer SELECT keeps FOR UPDATE SKIP LOCKED possible.
    queued, abandoned = _claimable_branches(now, max_attempts)
    branches = sa.union_all(sa.select(Job.id).where(queued), sa.select(Job.id).where(abandoned))
    candidates = session.execute(for_claim(
        sa.select(Job.id).where(Job.id.in_(branches)).order_by(Job.id).limit(limit),
        session)).scalars().all()
    claimed: list[ClaimedJob] = []
    for job_id in candidates:
        updated = cast(sa.CursorResult[Any], session.execute(
            sa.update(Job).where(Job.id == job_id, claimable)
            .values(state=JobState.RUNNING, lease_owner=owner, lease_expires_at=now + lease,
                    attempts=Job.attempts + 1, updated_at=now)
            .execution_options(synchronize_session=False)))
        if updated.rowcount != 1:
            continue
        row = session.execute(
            sa.select(Job.id, Job.study_id, Study.study_uid, Job.study_revision, Job.attempts)
            .join(Study, Study.id == Job.study_id).where(Job.id == job_id)).one()
        claimed.append(ClaimedJob(*row))
        audit(session, AuditAction.JOB_CLAIMED, owner, now, study_uid=row[2], job_id=job_id,
              attempt=row[4])
    return claimed


def renew_lease(session: Session, job_id: int, owner: str, lease: timedelta, now: datetime) -> bool:
    """Extend our lease; False when the job is no longer ours (it was reclaimed)."""
    updated = cast(sa.CursorResult[Any], session.execute(
        sa.update(Job).where(Job.id == job_id, Job.state == JobState.RUNNING,
                             Job.lease_owner == owner)
        .values(lease_expires_at=now + lease).execution_options(synchronize_session=False)))
    return updated.rowcount == 1


def taken_over(session: Session, job_id: int) -> bool:
    """After :func:`renew_lease` returned False: whether the job waits or runs elsewhere (its
    lease lapsed and it went back to the queue or to another worker), rather than being
    settled already (DONE or FAILED, by this worker's finisher a moment ago)."""
    state = session.scalar(sa.select(Job.state).where(Job.id == job_id))
    return state in (JobState.QUEUED, JobState.RUNNING)


def _abandon(session: Session, job: Job, actor: str, now: datetime, **detail: Any) -> AbandonedJob:
    set_job_state(job, JobState.FAILED, now)
    job.failure_reason = FailureReason.ABANDONED.value
    job.last_error = (f"its worker vanished (killed or crashed) during each of its "
                      f"{job.attempts} attempts")
    job.lease_owner = None
    job.lease_expires_at = None
    audit(session, AuditAction.JOB_FAILED, actor, now, study_uid=job.study.study_uid,
          job_id=job.id, attempt=job.attempts, reason=FailureReason.ABANDONED.value, **detail)
    return AbandonedJob(job.id, job.study.study_uid, job.attempts)


def abandon_exhausted(session: Session, now: datetime, max_attempts: int,
                      actor: str) -> list[AbandonedJob]:
    """RUNNING jobs whose lease expired on their last allowed attempt become FAILED
    (reason ``abandoned``); returns them, so the caller raises the alert."""
    jobs = session.scalars(for_claim(
        sa.select(Job).where(Job.state == JobState.RUNNING, Job.lease_expires_at < now,
                             Job.attempts >= max_attempts).order_by(Job.id), session)).all()
    return [_abandon(session, job, actor, now, lease_expired=True) for job in jobs]


def release_leases(session: Session, owner_prefix: str, now: datetime, max_attempts: int,
                   actor: str) -> tuple[list[int], list[AbandonedJob]]:
    """The RUNNING jobs of a worker known to be dead (``lease_owner`` starts with
    ``owner_prefix``, i.e. ``host:pid:``) go back to QUEUED at once instead of waiting for
    their lease to expire; the attempt they were on stays counted. One on its last allowed
    attempt becomes FAILED (``abandoned``). Returns (requeued job ids, abandoned jobs)."""
    jobs = session.scalars(for_claim(
        sa.select(Job).where(Job.state == JobState.RUNNING,
                             Job.lease_owner.startswith(owner_prefix, autoescape=True))
        .order_by(Job.id), session)).all()
    requeued: list[int] = []
    abandoned: list[AbandonedJob] = []
    for job in jobs:
        if job.attempts >= max_attempts:
            abandoned.append(_abandon(session, job, actor, now, released_from=job.lease_owner))
            continue
        owner = job.lease_owner
        set_job_state(job, JobState.QUEUED, now)
        job.failure_reason = FailureReason.ABANDONED.value
        job.last_error = "its worker vanished (killed or crashed); released for another attempt"
        job.lease_owner = None
        job.lease_expires_at = None
        job.next_attempt_at = now
        audit(session, AuditAction.JOB_RETRY, actor, now, study_uid=job.study.study_uid,
              job_id=job.id, attempt=job.attempts, reason=FailureReason.ABANDONED.value,
              released_from=owner)
        requeued.append(job.id)
    return requeued, abandoned


def running_owners(session: Session, owner_prefix: str) -> set[str]:
    """The lease owners of RUNNING jobs whose owner starts with ``owner_prefix`` (a host)."""
    return {owner for owner in session.scalars(
        sa.select(Job.lease_owner).where(Job.state == JobState.RUNNING,
                                         Job.lease_owner.startswith(owner_prefix, autoescape=True))
        .distinct()) if owner}


def job_inputs(session: Session, study_id: int) -> list[JobInput]:
    """The study's current instances (a superseded version is never an input), in arrival order."""
    rows = session.execute(
        # A purged instance's file is gone: it is no longer an input (retention, docs/operations.md).
        sa.select(Instance.sop_instance_uid,
                  sa.case((Instance.purged_at.is_(None), Instance.spool_path), else_=None),
                  Instance.eligible,
                  Instance.eligibility_reason,
                  Instance.content_hash)
        .where(Instance.study_id == study_id, Instance.superseded_at.is_(None))
        .order_by(Instance.id)).all()
    return [JobInput(*row) for row in rows]


def latest_result(session: Session, study_id: int) -> Result | None:
    return session.scalar(sa.select(Result).where(Result.study_id == study_id)
                          .order_by(Result.id.desc()).limit(1))


def _own_running_job(session: Session, job_id: int, owner: str) -> Job | None:
    job = session.get(Job, job_id, with_for_update=locks_rows(session))
    if job is None or job.state != JobState.RUNNING or job.lease_owner != owner:
        return None
    return job


def finish_job(session: Session, claimed: ClaimedJob, owner: str, record: ResultRecord,
               destinations: list[str], now: datetime,
               hl7_destinations: Sequence[str] = (),
               summary_destinations: Sequence[str] = ()) -> bool | None:
    """Record the result and one pending delivery per destination and object; the job becomes
    DONE.

    ``destinations`` get the SR (kind ``sr``); ``summary_destinations`` the summary image (kind
    ``summary``; only when the record has one); ``hl7_destinations`` an ORU^R01 (kind ``hl7``)
    with a new message control ID each, unless the study has no accession number: then none,
    and an audit row ``delivery_skipped`` (reason ``no_accession_number``) per destination.

    Returns True when a new result was recorded, False when an identical SR
    (same SOP Instance UID: same instances, same model) already exists, so
    nothing new is produced, and None when the job is no longer ours.
    """
    existing = session.scalar(sa.select(Result.id).where(
        Result.sr_sop_instance_uid == record.sr_sop_instance_uid))
    if existing is not None:
        return False if finish_unchanged(session, claimed, owner, record.sr_sop_instance_uid,
                                         now) else None
    job = _own_running_job(session, claimed.job_id, owner)
    if job is None:
        return None
    _done(job, now)
    result = Result(job_id=claimed.job_id, study_id=claimed.study_id,
                    study_revision=claimed.revision, model_name=record.model_name,
                    model_version=record.model_version, model_validated=record.model_validated,
                    probability=record.probability, decision=record.decision,
                    threshold=record.threshold, urgent_threshold=record.urgent_threshold,
                    elevated_threshold=record.elevated_threshold, priority=record.priority,
                    inference_seconds=record.inference_seconds,
                    sr_sop_instance_uid=record.sr_sop_instance_uid,
                    sr_series_uid=record.sr_series_uid, sr_path=record.sr_path,
                    summary_sop_instance_uid=record.summary_sop_instance_uid,
                    summary_path=record.summary_path,
                    detail=json.dumps(record.detail, sort_keys=True), created_at=now)
    session.add(result)
    session.flush()
    for name in destinations:
        session.add(Delivery(result_id=result.id, destination=name, kind=DeliveryKind.SR,
                             state=DeliveryState.PENDING, attempts=0, next_attempt_at=now,
                             created_at=now))
    for name in summary_destinations if record.summary_path else ():
        session.add(Delivery(result_id=result.id, destination=name, kind=DeliveryKind.SUMMARY,
                             state=DeliveryState.PENDING, attempts=0, next_attempt_at=now,
                             created_at=now))
    has_accession = bool(hl7_destinations) and bool((session.scalar(
        sa.select(Study.accession_number).where(Study.id == claimed.study_id)) or "").strip())
    for name in hl7_destinations:
        if not has_accession:
            audit(session, AuditAction.DELIVERY_SKIPPED, owner, now, study_uid=claimed.study_uid,
                  destination=name, kind=DeliveryKind.HL7.value, reason="no_accession_number")
            continue
        session.add(Delivery(result_id=result.id, destination=name, kind=DeliveryKind.HL7,
                             message_control_id=new_message_control_id(),
                             state=DeliveryState.PENDING, attempts=0, next_attempt_at=now,
                             created_at=now))
    images = record.detail.get("images", {})
    refused = {sop: v["refused"] for sop, v in images.items() if "refused" in v}
    notes = {sop: v["notes"] for sop, v in images.items() if v.get("notes")}
    per_image: dict[str, Any] = {}
    if hl7_destinations:
        per_image["hl7_destinations"] = list(hl7_destinations)
    if refused:
        per_image["refused"] = refused
    if notes:
        per_image["notes"] = notes
    audit(session, AuditAction.RESULT_RECORDED, owner, now, study_uid=claimed.study_uid,
          job_id=claimed.job_id, priority=record.priority, probability=record.probability,
          model=f"{record.model_name} {record.model_version}", sr=record.sr_sop_instance_uid,
          destinations=destinations, **per_image)
    if record.detail.get("header"):
        audit(session, AuditAction.HEADER_SANITISED, owner, now, study_uid=claimed.study_uid,
              job_id=claimed.job_id, repairs=record.detail["header"])
    audit(session, AuditAction.JOB_DONE, owner, now, study_uid=claimed.study_uid,
          job_id=claimed.job_id, outcome="new_result")
    return True


def new_message_control_id() -> str:
    """A fresh HL7 message control ID (MSH-10, at most 20 characters): 80 random bits in hex,
    unique in ``deliveries`` by constraint and, in practice, across installations."""
    return secrets.token_hex(10).upper()


def _done(job: Job, now: datetime) -> None:
    set_job_state(job, JobState.DONE, now)
    job.lease_owner = None
    job.lease_expires_at = None


def finish_unchanged(session: Session, claimed: ClaimedJob, owner: str, sr_sop_instance_uid: str,
                     now: datetime) -> bool:
    """The job's result is an SR the study already has (same content, same UID): the job
    becomes DONE and nothing new is recorded or sent. False when the job is no longer ours."""
    job = _own_running_job(session, claimed.job_id, owner)
    if job is None:
        return False
    _done(job, now)
    audit(session, AuditAction.JOB_DONE, owner, now, study_uid=claimed.study_uid,
          job_id=claimed.job_id, outcome="unchanged", sr=sr_sop_instance_uid)
    return True


def fail_job(session: Session, claimed: ClaimedJob, owner: str, error: str, *, transient: bool,
             now: datetime, max_attempts: int, retry_in: timedelta,
             reason: FailureReason = FailureReason.INTERNAL_ERROR) -> JobState | None:
    """A transient failure goes back to QUEUED after ``retry_in`` until ``max_attempts``;
    a permanent one (or the last attempt) is FAILED with its reason kept.

    ``error`` is free text for operators and must carry no header value (patient data);
    ``reason`` is the short code. Returns the new state, or None when the job is no
    longer ours (its lease was lost)."""
    job = _own_running_job(session, claimed.job_id, owner)
    if job is None:
        return None
    job.last_error = error[:2000]
    job.failure_reason = reason.value
    job.lease_owner = None
    job.lease_expires_at = None
    if transient and job.attempts < max_attempts:
        set_job_state(job, JobState.QUEUED, now)
        job.next_attempt_at = now + retry_in
        audit(session, AuditAction.JOB_RETRY, owner, now, study_uid=claimed.study_uid,
              job_id=job.id, attempt=job.attempts, reason=reason.value, error=error[:200])
        return JobState.QUEUED
    set_job_state(job, JobState.FAILED, now)
    audit(session, AuditAction.JOB_FAILED, owner, now, study_uid=claimed.study_uid,
          job_id=job.id, attempt=job.attempts, reason=reason.value, error=error[:200])
    return JobState.FAILED


def requeue_failed(session: Session, now: datetime, actor: str,
                   study_uid: str | None = None) -> int:
    """FAILED jobs (of one study, or all) back to QUEUED; returns how many."""
    query = sa.select(Job).join(Study, Study.id == Job.study_id).where(Job.state == JobState.FAILED)
    if study_uid is not None:
        query = query.where(Study.study_uid == study_uid)
    jobs = session.scalars(query).all()
    for job in jobs:
        set_job_state(job, JobState.QUEUED, now)
        job.attempts = 0
        job.next_attempt_at = None
        audit(session, AuditAction.JOB_REQUEUED, actor, now, study_uid=job.study.study_uid,
              job_id=job.id)
    return len(jobs)

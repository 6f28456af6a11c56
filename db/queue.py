"""Queue operations: the only code that changes a study's or a job's state.

Each function works inside the caller's unit of work (one session, one
transaction) and never commits itself, so a C-STORE's instance row, study
update and audit event land together or not at all.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db.models import AuditEvent, Instance, Job, Study
from db.states import AuditAction, JobState, StudyState, check_transition


@dataclass(frozen=True)
class InstanceRecord:
    """What the receiver knows about one stored instance (no patient data)."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    modality: str | None
    body_part: str | None
    view_position: str | None
    accession_number: str | None
    eligible: bool
    eligibility_reason: str
    spool_path: str | None
    size_bytes: int
    calling_ae: str


class StoreOutcome(enum.StrEnum):
    NEW = "new"
    DUPLICATE = "duplicate"


@dataclass(frozen=True)
class Completion:
    study_uid: str
    revision: int
    state: StudyState
    job_id: int | None


# The receiver's hot path runs once per C-STORE: plain Core statements on the
# tables, built once, executed with parameters (no ORM unit of work, no
# per-call statement construction).
_STUDIES = cast(sa.Table, Study.__table__)
_INSTANCES = cast(sa.Table, Instance.__table__)
_AUDIT = cast(sa.Table, AuditEvent.__table__)
_INSERT_AUDIT = sa.insert(_AUDIT)
_INSERT_INSTANCE = sa.insert(_INSTANCES)
_INSERT_STUDY = sa.insert(_STUDIES).returning(_STUDIES.c.id)
_SELECT_INSTANCE = sa.select(_INSTANCES.c.id).where(
    _INSTANCES.c.sop_instance_uid == sa.bindparam("sop_uid"))
_SELECT_STUDY = sa.select(_STUDIES.c.id, _STUDIES.c.state, _STUDIES.c.revision).where(
    _STUDIES.c.study_uid == sa.bindparam("study_uid"))
_COUNT_DUPLICATE = (
    sa.update(_INSTANCES).where(_INSTANCES.c.sop_instance_uid == sa.bindparam("sop_uid"))
    .values(receive_count=_INSTANCES.c.receive_count + 1).returning(_INSTANCES.c.receive_count))
_TOUCH_STUDY = (
    sa.update(_STUDIES)
    .where(_STUDIES.c.id == sa.bindparam("sid"), _STUDIES.c.last_received_at < sa.bindparam("t_new"))
    .values(last_received_at=sa.bindparam("t_new")))


def audit(session: Session, action: AuditAction, actor: str, now: datetime, *,
          study_uid: str | None = None, sop_instance_uid: str | None = None,
          **detail: Any) -> None:
    """Add an audit row. ``detail`` must never carry patient data."""
    session.connection().execute(_INSERT_AUDIT, {
        "at": now, "action": action, "actor": actor[:64], "study_uid": study_uid,
        "sop_instance_uid": sop_instance_uid,
        "detail": json.dumps(detail, sort_keys=True, default=str) if detail else None,
    })


def _count_duplicate(session: Session, rec: InstanceRecord, now: datetime) -> StoreOutcome:
    count = session.connection().execute(_COUNT_DUPLICATE, {"sop_uid": rec.sop_instance_uid}
                                         ).scalar_one()
    audit(session, AuditAction.INSTANCE_DUPLICATE, rec.calling_ae, now, study_uid=rec.study_uid,
          sop_instance_uid=rec.sop_instance_uid, receive_count=count)
    return StoreOutcome.DUPLICATE


def record_instance(session: Session, rec: InstanceRecord, now: datetime) -> StoreOutcome:
    """Insert a newly received instance and create, touch or re-open its study.

    A re-sent instance (same SOP Instance UID) is counted, not inserted again,
    and returns :attr:`StoreOutcome.DUPLICATE`; its study is left as it is.
    """
    conn = session.connection()
    if conn.execute(_SELECT_INSTANCE, {"sop_uid": rec.sop_instance_uid}).first() is not None:
        return _count_duplicate(session, rec, now)
    study_id, revision = _study_for_instance(session, rec, now)
    values = {
        "study_id": study_id, "series_uid": rec.series_uid,
        "sop_instance_uid": rec.sop_instance_uid, "sop_class_uid": rec.sop_class_uid,
        "transfer_syntax_uid": rec.transfer_syntax_uid, "modality": rec.modality,
        "body_part": rec.body_part, "view_position": rec.view_position,
        "eligible": rec.eligible, "eligibility_reason": rec.eligibility_reason,
        "spool_path": rec.spool_path, "size_bytes": rec.size_bytes, "calling_ae": rec.calling_ae,
        "received_at": now, "receive_count": 1, "study_revision": revision,
    }
    try:
        with conn.begin_nested():
            conn.execute(_INSERT_INSTANCE, values)
    except IntegrityError:
        # Another connection inserted the same instance between our check and insert
        # (possible on PostgreSQL; SQLite's BEGIN IMMEDIATE serialises writers).
        return _count_duplicate(session, rec, now)
    audit(session, AuditAction.INSTANCE_RECEIVED, rec.calling_ae, now,
          study_uid=rec.study_uid, sop_instance_uid=rec.sop_instance_uid,
          eligible=rec.eligible, reason=rec.eligibility_reason, stored=rec.spool_path is not None)
    return StoreOutcome.NEW


def _study_for_instance(session: Session, rec: InstanceRecord, now: datetime) -> tuple[int, int]:
    """The (id, revision) of the instance's study, created or re-opened as needed."""
    conn = session.connection()
    row = conn.execute(_SELECT_STUDY, {"study_uid": rec.study_uid}).first()
    if row is None:
        try:
            with conn.begin_nested():
                study_id = conn.execute(_INSERT_STUDY, {
                    "study_uid": rec.study_uid, "accession_number": rec.accession_number,
                    "state": StudyState.RECEIVING, "revision": 1, "first_received_at": now,
                    "last_received_at": now,
                }).scalar_one()
            return int(study_id), 1
        except IntegrityError:
            row = conn.execute(_SELECT_STUDY, {"study_uid": rec.study_uid}).first()
            if row is None:
                raise
    study_id, state, revision = row
    if state != StudyState.RECEIVING:
        study = session.get_one(Study, study_id)
        _reopen(session, study, rec.calling_ae, now)
        session.flush()
        revision = study.revision
    conn.execute(_TOUCH_STUDY, {"sid": study_id, "t_new": now})
    return int(study_id), int(revision)


def _reopen(session: Session, study: Study, actor: str, now: datetime) -> None:
    check_transition(study.state, StudyState.RECEIVING)
    previous = study.state
    study.state = StudyState.RECEIVING
    study.revision += 1
    study.completed_at = None
    queued = session.scalars(sa.select(Job).where(Job.study_id == study.id,
                                                  Job.state == JobState.QUEUED)).all()
    for job in queued:
        set_job_state(job, JobState.SUPERSEDED, now)
        audit(session, AuditAction.JOB_SUPERSEDED, actor, now, study_uid=study.study_uid,
              job_id=job.id, by_revision=study.revision)
    audit(session, AuditAction.STUDY_REOPENED, actor, now, study_uid=study.study_uid,
          previous_state=previous.value, revision=study.revision)


def set_job_state(job: Job, target: JobState, now: datetime) -> None:
    check_transition(job.state, target)
    job.state = target
    job.updated_at = now


def record_refusal(session: Session, calling_ae: str, now: datetime, reason: str,
                   status: int, study_uid: str | None, sop_instance_uid: str | None) -> None:
    """Audit an instance that was answered with a failure status."""
    audit(session, AuditAction.INSTANCE_REFUSED, calling_ae, now, study_uid=study_uid,
          sop_instance_uid=sop_instance_uid, reason=reason, status=f"0x{status:04X}")


def record_association_rejected(session: Session, calling_ae: str, address: str,
                                reason: str, now: datetime) -> None:
    audit(session, AuditAction.ASSOCIATION_REJECTED, calling_ae, now, address=address,
          reason=reason)


def complete_quiet_studies(session: Session, quiet_period: timedelta, now: datetime,
                           actor: str = "scheduler") -> list[Completion]:
    """Close every receiving study with no instance for ``quiet_period``.

    A study holding at least one eligible instance becomes COMPLETE and gets
    exactly one QUEUED job for its current revision (the conditional update
    and the unique (study, revision) key make a second scheduler a no-op);
    one without becomes IGNORED. Returns what was closed.
    """
    cutoff = now - quiet_period
    candidates = session.execute(
        sa.select(Study.id, Study.study_uid, Study.revision)
        .where(Study.state == StudyState.RECEIVING, Study.last_received_at <= cutoff)
        .order_by(Study.last_received_at)
    ).all()
    done: list[Completion] = []
    for study_id, study_uid, revision in candidates:
        has_eligible = session.scalar(
            sa.select(sa.exists().where(Instance.study_id == study_id, Instance.eligible))
        )
        target = StudyState.COMPLETE if has_eligible else StudyState.IGNORED
        check_transition(StudyState.RECEIVING, target)
        updated = cast(sa.CursorResult[Any], session.execute(
            sa.update(Study)
            .where(Study.id == study_id, Study.state == StudyState.RECEIVING,
                   Study.revision == revision, Study.last_received_at <= cutoff)
            .values(state=target, completed_at=now)
            .execution_options(synchronize_session=False)
        ))
        if updated.rowcount != 1:
            continue
        job_id = None
        if target is StudyState.COMPLETE:
            job = Job(study_id=study_id, study_revision=revision, state=JobState.QUEUED,
                      created_at=now, updated_at=now)
            session.add(job)
            session.flush()
            job_id = job.id
            audit(session, AuditAction.STUDY_COMPLETED, actor, now, study_uid=study_uid,
                  revision=revision)
            audit(session, AuditAction.JOB_ENQUEUED, actor, now, study_uid=study_uid,
                  job_id=job_id, revision=revision)
        else:
            audit(session, AuditAction.STUDY_IGNORED, actor, now, study_uid=study_uid,
                  revision=revision, reason="no_eligible_instance")
        done.append(Completion(study_uid, revision, target, job_id))
    return done


@dataclass(frozen=True)
class StudySummary:
    study_uid: str
    state: StudyState
    revision: int
    instances: int
    eligible: int
    first_received_at: datetime
    last_received_at: datetime
    job_state: JobState | None


def state_counts(session: Session) -> dict[str, dict[str, int]]:
    """Counts of studies and jobs per state, and of instances per eligibility."""
    studies = dict(session.execute(sa.select(Study.state, sa.func.count()).group_by(Study.state)).all())
    jobs = dict(session.execute(sa.select(Job.state, sa.func.count()).group_by(Job.state)).all())
    inst = dict(session.execute(
        sa.select(Instance.eligible, sa.func.count()).group_by(Instance.eligible)).all())
    return {
        "studies": {s.value: int(studies.get(s, 0)) for s in StudyState},
        "jobs": {s.value: int(jobs.get(s, 0)) for s in JobState},
        "instances": {"eligible": int(inst.get(True, 0)), "ineligible": int(inst.get(False, 0))},
    }


def recent_studies(session: Session, limit: int = 20) -> list[StudySummary]:
    """The most recently active studies, newest first, with their latest job's state."""
    n_inst = (sa.select(sa.func.count()).where(Instance.study_id == Study.id)
              .correlate(Study).scalar_subquery())
    n_elig = (sa.select(sa.func.count()).where(Instance.study_id == Study.id, Instance.eligible)
              .correlate(Study).scalar_subquery())
    last_job = (sa.select(Job.state).where(Job.study_id == Study.id)
                .order_by(Job.id.desc()).limit(1).correlate(Study).scalar_subquery())
    rows = session.execute(
        sa.select(Study, n_inst, n_elig, last_job)
        .order_by(Study.last_received_at.desc()).limit(limit)
    ).all()
    return [
        StudySummary(s.study_uid, s.state, s.revision, int(ni), int(ne), s.first_received_at,
                     s.last_received_at, JobState(js) if js is not None else None)
        for s, ni, ne, js in rows
    ]

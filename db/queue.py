"""Queue operations: the only code that changes a study's or a job's state.

Each function works inside the caller's unit of work (one session, one
transaction) and never commits itself, so a C-STORE's instance row, study
update and audit event land together or not at all.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, cast

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from db.engine import for_claim, locks_rows
from db.models import AuditEvent, Instance, Job, Study
from db.states import AuditAction, JobState, StudyState, check_transition

DuplicatePolicy = Literal["keep_first", "replace_and_rescore"]
"""What a re-send of a held SOP Instance UID with other bytes does (``receiver.duplicate_policy``)."""

Placer = Callable[[int], str | None]
"""Called with the version a kept instance gets; puts its file in place and returns the spool
path (relative), or None when no file is kept. Only ever called inside the deciding transaction."""


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
    """Where the file already is, for callers that place it themselves (no ``place``)."""
    size_bytes: int
    calling_ae: str
    content_hash: str | None = None
    """sha256 hex of the data set bytes as received (without the file meta)."""


class StoreOutcome(enum.StrEnum):
    NEW = "new"
    """A SOP Instance UID not held before: a row (version 1) and its file."""
    DUPLICATE = "duplicate"
    """The same bytes as the held copy (or a held copy of unknown hash): counted only."""
    CONFLICT_KEPT_FIRST = "conflict_kept_first"
    """Other bytes under ``keep_first``: the held copy stays, the conflict is audited."""
    NEW_VERSION = "new_version"
    """Other bytes under ``replace_and_rescore``: a new row and file beside the superseded one."""


@dataclass(frozen=True)
class Stored:
    """What :func:`record_instance` decided and recorded."""

    outcome: StoreOutcome
    version: int
    """The version of the current row of this SOP Instance UID after the call."""
    spool_path: str | None
    """The file this call's row points to; None when no row was inserted (or no file kept)."""
    held_hash: str | None = None
    """The content hash of the copy already held (duplicates and conflicts)."""
    reopened: bool = False

    @property
    def inserted(self) -> bool:
        return self.outcome in (StoreOutcome.NEW, StoreOutcome.NEW_VERSION)


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
_SELECT_CURRENT = sa.select(
    _INSTANCES.c.id, _INSTANCES.c.content_hash, _INSTANCES.c.version, _INSTANCES.c.eligible,
).where(_INSTANCES.c.sop_instance_uid == sa.bindparam("sop_uid"),
        _INSTANCES.c.superseded_at.is_(None))
_SELECT_LAST_VERSION = sa.select(sa.func.max(_INSTANCES.c.version)).where(
    _INSTANCES.c.sop_instance_uid == sa.bindparam("sop_uid"))
_SELECT_STUDY = sa.select(_STUDIES.c.id, _STUDIES.c.state, _STUDIES.c.revision).where(
    _STUDIES.c.study_uid == sa.bindparam("study_uid"))
# PostgreSQL: the receiver locks its study's row while it decides, so the scheduler cannot
# close the study between that read and the instance's insert (the arrival would be filed
# under a revision already queued). SQLite's BEGIN IMMEDIATE serialises writers already.
_SELECT_STUDY_LOCKED = _SELECT_STUDY.with_for_update()
_COUNT_DUPLICATE = (
    sa.update(_INSTANCES).where(_INSTANCES.c.id == sa.bindparam("iid"))
    .values(receive_count=_INSTANCES.c.receive_count + 1).returning(_INSTANCES.c.receive_count))
_SUPERSEDE = (
    sa.update(_INSTANCES)
    .where(_INSTANCES.c.id == sa.bindparam("iid"), _INSTANCES.c.superseded_at.is_(None))
    .values(superseded_at=sa.bindparam("t_now")))
_TOUCH_STUDY = (
    sa.update(_STUDIES)
    .where(_STUDIES.c.id == sa.bindparam("sid"), _STUDIES.c.last_received_at < sa.bindparam("t_new"))
    .values(last_received_at=sa.bindparam("t_new")))
HASH_PREFIX = 16
"""Hex characters of a content hash written into audit details and logs."""


def audit(session: Session, action: AuditAction, actor: str, now: datetime, *,
          study_uid: str | None = None, sop_instance_uid: str | None = None,
          **detail: Any) -> None:
    """Add an audit row. ``detail`` must never carry patient data."""
    session.connection().execute(_INSERT_AUDIT, {
        "at": now, "action": action, "actor": actor[:64], "study_uid": study_uid,
        "sop_instance_uid": sop_instance_uid,
        "detail": json.dumps(detail, sort_keys=True, default=str) if detail else None,
    })


def _short(content_hash: str | None) -> str | None:
    return None if content_hash is None else content_hash[:HASH_PREFIX]


def record_instance(session: Session, rec: InstanceRecord, now: datetime, *,
                    policy: DuplicatePolicy = "keep_first",
                    place: Placer | None = None) -> Stored:
    """Decide NEW or DUPLICATE for a received instance and record it, in the caller's transaction.

    - No current row for the SOP Instance UID: NEW. ``place(1)`` puts the file in place,
      the row (version 1) is inserted, the study created, touched or re-opened.
    - A current row with the same content hash (or with no hash recorded): DUPLICATE, its
      ``receive_count`` grows; no file is placed, the study is left as it is.
    - Other bytes, ``keep_first``: CONFLICT_KEPT_FIRST; nothing changes but an
      ``instance_conflict`` audit row with both hashes' prefixes.
    - Other bytes, ``replace_and_rescore``: NEW_VERSION; the current row gets
      ``superseded_at``, ``place(n + 1)`` puts the new file beside the old one, a row of
      version n + 1 is inserted, and the study re-opens for a new revision.

    ``place`` (default: ``rec.spool_path`` is already in place) is called only when a row
    is to be inserted. Under concurrent receivers (PostgreSQL) a lost race on the unique
    index is decided again, so ``place`` may run twice; the caller removes every placed
    file that :attr:`Stored.spool_path` does not name. Raises SQLAlchemyError when the
    database fails (also when the race is lost three times), whatever ``place`` raises
    when the file cannot be placed.
    """
    placer: Placer = place if place is not None else (lambda _version: rec.spool_path)
    attempts = 3
    for attempt in range(1, attempts + 1):
        stored = _decide_and_record(session, rec, now, policy, placer, attempt < attempts)
        if stored is not None:
            return stored
    raise AssertionError("unreachable: the last attempt raises instead of returning None")


def _decide_and_record(session: Session, rec: InstanceRecord, now: datetime,
                       policy: DuplicatePolicy, place: Placer, may_retry: bool) -> Stored | None:
    """One decision; None when a concurrent writer won the race and it may be taken again."""
    conn = session.connection()
    current = conn.execute(_SELECT_CURRENT, {"sop_uid": rec.sop_instance_uid}).first()
    if current is None:
        last = conn.execute(_SELECT_LAST_VERSION, {"sop_uid": rec.sop_instance_uid}).scalar()
        return _insert(session, rec, now, int(last or 0) + 1, place, None, may_retry)
    held_hash = current.content_hash
    if held_hash is None or rec.content_hash is None or held_hash == rec.content_hash:
        count = conn.execute(_COUNT_DUPLICATE, {"iid": current.id}).scalar_one()
        audit(session, AuditAction.INSTANCE_DUPLICATE, rec.calling_ae, now,
              study_uid=rec.study_uid, sop_instance_uid=rec.sop_instance_uid,
              receive_count=count, version=current.version,
              same_bytes=None if held_hash is None or rec.content_hash is None else True)
        return Stored(StoreOutcome.DUPLICATE, int(current.version), None, held_hash)
    if policy == "keep_first":
        audit(session, AuditAction.INSTANCE_CONFLICT, rec.calling_ae, now,
              study_uid=rec.study_uid, sop_instance_uid=rec.sop_instance_uid,
              policy=policy, held_hash=_short(held_hash), received_hash=_short(rec.content_hash),
              held_version=current.version, kept="held")
        return Stored(StoreOutcome.CONFLICT_KEPT_FIRST, int(current.version), None, held_hash)
    return _insert(session, rec, now, int(current.version) + 1, place, current, may_retry)


def _insert(session: Session, rec: InstanceRecord, now: datetime, version: int, place: Placer,
            supersedes: sa.Row[Any, Any, Any, Any] | None, may_retry: bool) -> Stored | None:
    conn = session.connection()
    try:
        # An ORM savepoint: rolled back, it also expires a study that _reopen changed.
        with session.begin_nested():
            if supersedes is not None:
                updated = cast(sa.CursorResult[Any], conn.execute(
                    _SUPERSEDE, {"iid": supersedes.id, "t_now": now}))
                if updated.rowcount != 1:
                    raise _Raced(f"instance {rec.sop_instance_uid} was superseded concurrently")
            # An eligible arrival, or the replacement of an eligible copy, changes what is scored.
            changes_scoring = rec.eligible or bool(supersedes is not None and supersedes.eligible)
            study_id, revision, reopened = _study_for_instance(session, rec, now, changes_scoring)
            spool_path = place(version)
            conn.execute(_INSERT_INSTANCE, {
                "study_id": study_id, "series_uid": rec.series_uid,
                "sop_instance_uid": rec.sop_instance_uid, "sop_class_uid": rec.sop_class_uid,
                "transfer_syntax_uid": rec.transfer_syntax_uid, "modality": rec.modality,
                "body_part": rec.body_part, "view_position": rec.view_position,
                "eligible": rec.eligible, "eligibility_reason": rec.eligibility_reason,
                "spool_path": spool_path, "size_bytes": rec.size_bytes,
                "calling_ae": rec.calling_ae, "received_at": now, "receive_count": 1,
                "study_revision": revision, "content_hash": rec.content_hash, "version": version,
            })
    except (IntegrityError, _Raced):
        # Another receiver recorded this SOP Instance UID between our check and insert
        # (possible on PostgreSQL; SQLite's BEGIN IMMEDIATE serialises writers): decide again.
        if not may_retry:
            raise
        return None
    if supersedes is None:
        audit(session, AuditAction.INSTANCE_RECEIVED, rec.calling_ae, now,
              study_uid=rec.study_uid, sop_instance_uid=rec.sop_instance_uid,
              eligible=rec.eligible, reason=rec.eligibility_reason, stored=spool_path is not None,
              revision=revision, reopened=reopened)
        return Stored(StoreOutcome.NEW, version, spool_path, None, reopened)
    audit(session, AuditAction.INSTANCE_CONFLICT, rec.calling_ae, now,
          study_uid=rec.study_uid, sop_instance_uid=rec.sop_instance_uid,
          policy="replace_and_rescore", held_hash=_short(supersedes.content_hash),
          received_hash=_short(rec.content_hash), held_version=supersedes.version,
          kept="both", version=version, revision=revision, reopened=reopened)
    return Stored(StoreOutcome.NEW_VERSION, version, spool_path, supersedes.content_hash, reopened)


class _Raced(SQLAlchemyError):
    """The row to supersede was superseded by a concurrent writer."""


def _study_for_instance(session: Session, rec: InstanceRecord, now: datetime,
                        changes_scoring: bool) -> tuple[int, int, bool]:
    """The (id, revision, re-opened) of the instance's study, created or re-opened as needed.

    A closed (complete or ignored) study re-opens for a new revision only when the arrival
    changes what is scored (``changes_scoring``: an eligible image); a late lateral or
    non-chest image is recorded under the current revision and leaves the study closed.
    """
    conn = session.connection()
    select_study = _SELECT_STUDY_LOCKED if locks_rows(session) else _SELECT_STUDY
    row = conn.execute(select_study, {"study_uid": rec.study_uid}).first()
    if row is None:
        try:
            with conn.begin_nested():
                study_id = conn.execute(_INSERT_STUDY, {
                    "study_uid": rec.study_uid, "accession_number": rec.accession_number,
                    "state": StudyState.RECEIVING, "revision": 1, "first_received_at": now,
                    "last_received_at": now,
                }).scalar_one()
            return int(study_id), 1, False
        except IntegrityError:
            row = conn.execute(select_study, {"study_uid": rec.study_uid}).first()
            if row is None:
                raise
    study_id, state, revision = row
    reopened = False
    if state != StudyState.RECEIVING:
        if not changes_scoring:
            return int(study_id), int(revision), False
        study = session.get_one(Study, study_id)
        _reopen(session, study, rec.calling_ae, now)
        session.flush()
        revision, reopened = study.revision, True
    conn.execute(_TOUCH_STUDY, {"sid": study_id, "t_new": now})
    return int(study_id), int(revision), reopened


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


HELD = sa.and_(Instance.eligible.is_(True), Instance.purged_at.is_(None),
               Instance.superseded_at.is_(None))
"""An instance that scoring can use: eligible, its file not purged, not superseded by a later
version. Completion and rescoring count only these."""


def _holds_scorable(session: Session, study_id: int) -> bool:
    return bool(session.scalar(sa.select(sa.exists().where(Instance.study_id == study_id, HELD))))


def any_quiet_study(session: Session, quiet_period: timedelta, now: datetime) -> bool:
    """Whether a receiving study has been quiet for ``quiet_period``: a read, so that an idle
    tick takes no write lock (SQLite's one writer is then free for the receivers)."""
    return bool(session.scalar(sa.select(sa.exists().where(
        Study.state == StudyState.RECEIVING, Study.last_received_at <= now - quiet_period))))


def complete_quiet_studies(session: Session, quiet_period: timedelta, now: datetime,
                           actor: str = "scheduler") -> list[Completion]:
    """Close every receiving study with no instance for ``quiet_period``.

    A study still holding at least one scorable instance (:data:`HELD`: eligible,
    not purged, not superseded) becomes COMPLETE and gets exactly one QUEUED job
    for its current revision (the conditional update and the unique (study,
    revision) key make a second scheduler a no-op); one without becomes IGNORED,
    so a study whose images retention purged is not queued to fail again.
    Returns what was closed.
    """
    cutoff = now - quiet_period
    # SKIP LOCKED (PostgreSQL): a study that another scheduler is closing, or a receiver is
    # filing an instance into, is left for the next tick instead of waited for.
    candidates = session.execute(for_claim(
        sa.select(Study.id, Study.study_uid, Study.revision)
        .where(Study.state == StudyState.RECEIVING, Study.last_received_at <= cutoff)
        .order_by(Study.last_received_at), session)
    ).all()
    done: list[Completion] = []
    for study_id, study_uid, revision in candidates:
        target = StudyState.COMPLETE if _holds_scorable(session, study_id) else StudyState.IGNORED
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
    """Counts of studies and jobs per state, and of current instances per eligibility."""
    studies = dict(session.execute(sa.select(Study.state, sa.func.count()).group_by(Study.state)).all())
    jobs = dict(session.execute(sa.select(Job.state, sa.func.count()).group_by(Job.state)).all())
    inst = dict(session.execute(
        sa.select(Instance.eligible, sa.func.count()).where(Instance.superseded_at.is_(None))
        .group_by(Instance.eligible)).all())
    return {
        "studies": {s.value: int(studies.get(s, 0)) for s in StudyState},
        "jobs": {s.value: int(jobs.get(s, 0)) for s in JobState},
        "instances": {"eligible": int(inst.get(True, 0)), "ineligible": int(inst.get(False, 0))},
    }


def recent_studies(session: Session, limit: int = 20) -> list[StudySummary]:
    """The most recently active studies, newest first, with their latest job's state."""
    n_inst = (sa.select(sa.func.count())
              .where(Instance.study_id == Study.id, Instance.superseded_at.is_(None))
              .correlate(Study).scalar_subquery())
    n_elig = (sa.select(sa.func.count())
              .where(Instance.study_id == Study.id, Instance.superseded_at.is_(None),
                     Instance.eligible)
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


def recorded_spool_paths(session: Session, paths: list[str]) -> set[str]:
    """Which of ``paths`` a row points to (the receiver asks after a commit that raised)."""
    if not paths:
        return set()
    found = session.scalars(sa.select(Instance.spool_path).where(Instance.spool_path.in_(paths)))
    return {path for path in found if path is not None}

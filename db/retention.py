"""Which spooled files retention may delete, and recording that it did.

A study's images go ``delivered_hours`` after its latest result reached every destination
(or was recorded, when nothing is to be sent), provided that result covers the study's current
revision and no job for it is waiting. Ineligible images go ``ineligible_hours`` after the study
stopped receiving. Rows, results, SRs and the audit trail are kept.
"""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.orm import Session

from db.models import Delivery, Instance, Job, Result, Study
from db.queue import audit
from db.states import AuditAction, DeliveryState, JobState, StudyState


class PurgeReason(enum.StrEnum):
    DELIVERED = "delivered"
    INELIGIBLE = "ineligible"


@dataclass(frozen=True)
class PurgeCandidate:
    instance_id: int
    study_uid: str
    spool_path: str
    size_bytes: int
    reason: PurgeReason


def candidates(session: Session, now: datetime, delivered_hours: float, ineligible_hours: float,
               limit: int = 5000) -> list[PurgeCandidate]:
    latest = (sa.select(Result.study_id, sa.func.max(Result.id).label("result_id"))
              .group_by(Result.study_id).subquery())
    not_delivered = sa.case((Delivery.state != DeliveryState.DELIVERED, 1), else_=0)
    sent = (sa.select(Delivery.result_id, sa.func.sum(not_delivered).label("open"),
                      sa.func.max(Delivery.delivered_at).label("last"))
            .group_by(Delivery.result_id).subquery())
    waiting = (sa.select(Job.study_id).where(Job.state.in_([JobState.QUEUED, JobState.RUNNING]))
               .distinct().subquery())
    held = sa.and_(Instance.spool_path.is_not(None), Instance.purged_at.is_(None))
    delivered = sa.and_(
        Instance.eligible.is_(True), Study.state == StudyState.COMPLETE,
        Result.study_revision == Study.revision, waiting.c.study_id.is_(None),
        sa.func.coalesce(sent.c.open, 0) == 0,
        sa.func.coalesce(sent.c.last, Result.created_at) <= now - timedelta(hours=delivered_hours))
    ineligible = sa.and_(Instance.eligible.is_(False), Study.state != StudyState.RECEIVING,
                         Study.last_received_at <= now - timedelta(hours=ineligible_hours))
    rows = session.execute(
        sa.select(Instance.id, Study.study_uid, Instance.spool_path, Instance.size_bytes,
                  Instance.eligible)
        .join(Study, Study.id == Instance.study_id)
        .outerjoin(latest, latest.c.study_id == Study.id)
        .outerjoin(Result, Result.id == latest.c.result_id)
        .outerjoin(sent, sent.c.result_id == Result.id)
        .outerjoin(waiting, waiting.c.study_id == Study.id)
        .where(held, sa.or_(delivered, ineligible)).order_by(Instance.id).limit(limit)).all()
    return [PurgeCandidate(r.id, r.study_uid, r.spool_path, r.size_bytes,
                           PurgeReason.DELIVERED if r.eligible else PurgeReason.INELIGIBLE) for r in rows]


def mark_purged(session: Session, purged: list[PurgeCandidate], actor: str, now: datetime) -> None:
    """Record deleted files (after they were deleted) and one audit event per study."""
    if not purged:
        return
    session.execute(sa.update(Instance).where(Instance.id.in_([p.instance_id for p in purged]))
                    .values(purged_at=now))
    per_study: dict[str, Counter[str]] = {}
    for p in purged:
        per_study.setdefault(p.study_uid, Counter())[p.reason.value] += 1
    for study_uid, counts in per_study.items():
        audit(session, AuditAction.STUDY_PURGED, actor, now, study_uid=study_uid, files=dict(counts))

"""Deliveries of SRs to destinations: due rows, outcomes, retries, resend."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.orm import Session

from db.engine import for_claim
from db.models import Delivery, Result, Study
from db.queue import audit
from db.states import AuditAction, DeliveryState, check_transition


@dataclass(frozen=True)
class DueDelivery:
    delivery_id: int
    destination: str
    sr_path: str
    sr_sop_instance_uid: str
    study_uid: str
    attempts: int
    received_at: datetime


def due_query(now: datetime, limit: int = 20
              ) -> sa.Select[int, str, str, str, str, int, datetime]:
    """The due-delivery SELECT (pending, ``next_attempt_at`` passed, oldest first): a range on
    the ``(state, next_attempt_at)`` index, never a scan of the table."""
    return (sa.select(Delivery.id, Delivery.destination, Result.sr_path,
                      Result.sr_sop_instance_uid, Study.study_uid, Delivery.attempts,
                      Study.first_received_at)
            .join(Result, Result.id == Delivery.result_id).join(Study, Study.id == Result.study_id)
            .where(Delivery.state == DeliveryState.PENDING, Delivery.next_attempt_at <= now)
            .order_by(Delivery.next_attempt_at, Delivery.id).limit(limit))


def due(session: Session, now: datetime, limit: int = 20) -> list[DueDelivery]:
    """The deliveries to attempt now, locked against other senders on PostgreSQL."""
    rows = session.execute(for_claim(due_query(now, limit), session)).all()
    return [DueDelivery(*row) for row in rows]


def _set(delivery: Delivery, target: DeliveryState) -> None:
    check_transition(delivery.state, target)
    delivery.state = target


def mark_delivered(session: Session, delivery_id: int, now: datetime, detail: str) -> None:
    d = session.get_one(Delivery, delivery_id)
    _set(d, DeliveryState.DELIVERED)
    d.attempts += 1
    d.delivered_at = now
    d.last_reason, d.last_detail = "delivered", detail[:500]
    audit(session, AuditAction.DELIVERY_SENT, "sender", now, study_uid=_study_uid(session, d),
          destination=d.destination, attempt=d.attempts)


def mark_failed_attempt(session: Session, delivery_id: int, now: datetime, reason: str,
                        detail: str, retry_in: timedelta | None) -> DeliveryState:
    """Record a failed attempt: PENDING again after ``retry_in``, or FAILED at once when
    ``retry_in`` is None (a permanent failure, or the retry policy's last attempt).
    Returns the new state."""
    d = session.get_one(Delivery, delivery_id)
    d.attempts += 1
    d.last_reason, d.last_detail = reason, detail[:500]
    study_uid = _study_uid(session, d)
    if retry_in is None:
        _set(d, DeliveryState.FAILED)
        audit(session, AuditAction.DELIVERY_FAILED, "sender", now, study_uid=study_uid,
              destination=d.destination, attempt=d.attempts, reason=reason)
        return DeliveryState.FAILED
    d.next_attempt_at = now + retry_in
    audit(session, AuditAction.DELIVERY_RETRY, "sender", now, study_uid=study_uid,
          destination=d.destination, attempt=d.attempts, reason=reason)
    return DeliveryState.PENDING


def _study_uid(session: Session, d: Delivery) -> str:
    return session.execute(sa.select(Study.study_uid).join(Result, Result.study_id == Study.id)
                           .where(Result.id == d.result_id)).scalar_one()


@dataclass(frozen=True)
class DeliveryRow:
    study_uid: str
    destination: str
    state: DeliveryState
    attempts: int
    last_reason: str | None
    next_attempt_at: datetime
    sr_sop_instance_uid: str


def listing(session: Session, states: tuple[DeliveryState, ...]) -> list[DeliveryRow]:
    rows = session.execute(
        sa.select(Study.study_uid, Delivery.destination, Delivery.state, Delivery.attempts,
                  Delivery.last_reason, Delivery.next_attempt_at, Result.sr_sop_instance_uid)
        .join(Result, Result.id == Delivery.result_id).join(Study, Study.id == Result.study_id)
        .where(Delivery.state.in_(states)).order_by(Delivery.id)).all()
    return [DeliveryRow(*row) for row in rows]


def resend(session: Session, study_uid: str, now: datetime, actor: str) -> int:
    """Re-queue the deliveries of a study's latest SR; returns how many."""
    result_id = session.scalar(
        sa.select(Result.id).join(Study, Study.id == Result.study_id)
        .where(Study.study_uid == study_uid).order_by(Result.id.desc()).limit(1))
    if result_id is None:
        return 0
    rows = session.scalars(sa.select(Delivery).where(Delivery.result_id == result_id)).all()
    for d in rows:
        if d.state != DeliveryState.PENDING:
            _set(d, DeliveryState.PENDING)
        d.attempts = 0
        d.next_attempt_at = now
        audit(session, AuditAction.DELIVERY_REQUEUED, actor, now, study_uid=study_uid,
              destination=d.destination)
    return len(rows)

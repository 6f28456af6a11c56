"""Deliveries of a result's objects (SR, HL7 message) to destinations: claims of due rows,
outcomes, retries, resend.

A claim is a lease written in the row: :func:`due` selects the due rows (``FOR UPDATE SKIP
LOCKED`` on PostgreSQL) and, in the same transaction, pushes their ``next_attempt_at`` forward
by the claim lease, so another ``serve`` polling the same database does not see them as due.
:func:`start_attempt` renews one row's lease just before its attempt, on condition that the
row still carries this claim's time, so a row whose claim lapsed (and that another sender may
have claimed since) is skipped, never sent twice. Recording the outcome sets the real next
time. A sender that crashes mid-send leaves the row due again once the lease has passed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.orm import Session

from db.engine import for_claim
from db.models import Delivery, Result, Study
from db.queue import audit
from db.states import AuditAction, DeliveryKind, DeliveryState, check_transition

DEFAULT_CLAIM_LEASE = timedelta(minutes=2)
"""How long a claimed delivery stays invisible to other senders when the caller names no
lease (the sender passes one derived from ``delivery.timeout_s``)."""


@dataclass(frozen=True)
class DueDelivery:
    delivery_id: int
    destination: str
    object_path: str | None
    """The file of the DICOM object the delivery sends (kind ``sr``: the SR; ``summary``: the
    summary image), relative to the spool root; an HL7 delivery carries its result's SR here,
    unused."""
    object_uid: str | None
    study_uid: str
    attempts: int
    received_at: datetime
    kind: DeliveryKind = DeliveryKind.SR
    message_control_id: str | None = None
    claimed_until: datetime | None = None
    """The ``next_attempt_at`` this claim wrote: the row is ours while it still holds it."""


def due_query(now: datetime, limit: int = 20
              ) -> sa.Select[int, str, str | None, str | None, str, int, datetime, DeliveryKind,
                             str | None]:
    """The due-delivery SELECT (pending, ``next_attempt_at`` passed, oldest first): a range on
    the ``(state, next_attempt_at)`` index, never a scan of the table."""
    summary = Delivery.kind == DeliveryKind.SUMMARY
    return (sa.select(Delivery.id, Delivery.destination,
                      sa.case((summary, Result.summary_path), else_=Result.sr_path),
                      sa.case((summary, Result.summary_sop_instance_uid),
                              else_=Result.sr_sop_instance_uid), Study.study_uid, Delivery.attempts,
                      Study.first_received_at, Delivery.kind, Delivery.message_control_id)
            .join(Result, Result.id == Delivery.result_id).join(Study, Study.id == Result.study_id)
            .where(Delivery.state == DeliveryState.PENDING, Delivery.next_attempt_at <= now)
            .order_by(Delivery.next_attempt_at, Delivery.id).limit(limit))


def any_due(session: Session, now: datetime) -> bool:
    """Whether a delivery is due: a read, so that an idle tick takes no write lock (SQLite's
    one writer is then free for the receivers)."""
    return bool(session.scalar(sa.select(sa.exists().where(
        Delivery.state == DeliveryState.PENDING, Delivery.next_attempt_at <= now))))


def due(session: Session, now: datetime, limit: int = 20, *,
        lease: timedelta = DEFAULT_CLAIM_LEASE) -> list[DueDelivery]:
    """Claim the deliveries to attempt now: selected (locked against other senders on
    PostgreSQL) and, in the same transaction, made not due for ``lease``. Two claims at the
    same ``now`` never return the same delivery."""
    rows = session.execute(for_claim(due_query(now, limit), session)).all()
    if not rows:
        return []
    until = now + lease
    session.execute(sa.update(Delivery).where(Delivery.id.in_([row[0] for row in rows]))
                    .values(next_attempt_at=until).execution_options(synchronize_session=False))
    return [DueDelivery(*row, claimed_until=until) for row in rows]


def start_attempt(session: Session, item: DueDelivery, now: datetime,
                  lease: timedelta) -> DueDelivery | None:
    """Renew the claim of ``item`` for one attempt (``now + lease``); None when the row no
    longer carries this claim (it lapsed and another sender may hold it): do not send."""
    until = now + lease
    updated = cast(sa.CursorResult[Any], session.execute(
        sa.update(Delivery).where(Delivery.id == item.delivery_id,
                                  Delivery.state == DeliveryState.PENDING,
                                  Delivery.next_attempt_at == item.claimed_until)
        .values(next_attempt_at=until).execution_options(synchronize_session=False)))
    if updated.rowcount != 1:
        return None
    return dataclasses.replace(item, claimed_until=until)


def release(session: Session, items: list[DueDelivery], now: datetime) -> int:
    """Give back claimed deliveries that were not attempted (due again at ``now``); a row
    whose claim already lapsed is left alone. Returns how many were released."""
    released = 0
    for item in items:
        updated = cast(sa.CursorResult[Any], session.execute(
            sa.update(Delivery).where(Delivery.id == item.delivery_id,
                                      Delivery.state == DeliveryState.PENDING,
                                      Delivery.next_attempt_at == item.claimed_until)
            .values(next_attempt_at=now).execution_options(synchronize_session=False)))
        released += updated.rowcount
    return released


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
          destination=d.destination, attempt=d.attempts, **_what(d))


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
              destination=d.destination, attempt=d.attempts, reason=reason, **_what(d))
        return DeliveryState.FAILED
    d.next_attempt_at = now + retry_in
    audit(session, AuditAction.DELIVERY_RETRY, "sender", now, study_uid=study_uid,
          destination=d.destination, attempt=d.attempts, reason=reason, **_what(d))
    return DeliveryState.PENDING


def _what(d: Delivery) -> dict[str, str]:
    """The audit detail naming the delivered object: its kind, and an HL7 message's MSH-10."""
    what = {"kind": d.kind.value}
    if d.message_control_id:
        what["message_control_id"] = d.message_control_id
    return what


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
    kind: DeliveryKind = DeliveryKind.SR
    message_control_id: str | None = None
    last_detail: str | None = None
    """The peer's answer (a C-STORE Error Comment, an HL7 error text): for operators only."""


def listing(session: Session, states: tuple[DeliveryState, ...]) -> list[DeliveryRow]:
    """Deliveries of every kind in these states, oldest first."""
    rows = session.execute(
        sa.select(Study.study_uid, Delivery.destination, Delivery.state, Delivery.attempts,
                  Delivery.last_reason, Delivery.next_attempt_at, Result.sr_sop_instance_uid,
                  Delivery.kind, Delivery.message_control_id, Delivery.last_detail)
        .join(Result, Result.id == Delivery.result_id).join(Study, Study.id == Result.study_id)
        .where(Delivery.state.in_(states)).order_by(Delivery.id)).all()
    return [DeliveryRow(row[0], row[1], row[2], row[3], row[4], row[5], row[6], kind=row[7],
                        message_control_id=row[8], last_detail=row[9]) for row in rows]


@dataclass(frozen=True)
class ResultMessage:
    """What an HL7 result message says, read from the result, its study and its delivery."""

    message_control_id: str
    study_uid: str
    accession_number: str | None
    correction: bool
    """An earlier result of the same study exists: this one supersedes it (status C)."""
    model_name: str
    model_version: str
    model_validated: bool
    probability: float | None
    decision: bool | None
    threshold: float
    priority: str
    scored_at: datetime


def result_message(session: Session, delivery_id: int) -> ResultMessage:
    """The content of an HL7 delivery's message. Raises ``NoResultFound`` for an unknown id."""
    d = session.get_one(Delivery, delivery_id)
    result = session.get_one(Result, d.result_id)
    study = session.get_one(Study, result.study_id)
    earlier = session.scalar(sa.select(sa.func.count()).select_from(Result).where(
        Result.study_id == study.id, Result.id < result.id)) or 0
    return ResultMessage(
        message_control_id=d.message_control_id or "", study_uid=study.study_uid,
        accession_number=study.accession_number, correction=earlier > 0,
        model_name=result.model_name, model_version=result.model_version,
        model_validated=result.model_validated, probability=result.probability,
        decision=result.decision, threshold=result.threshold, priority=result.priority,
        scored_at=result.created_at)


def resend(session: Session, study_uid: str, now: datetime, actor: str) -> int:
    """Re-queue the deliveries (SR, summary image, HL7) of a study's latest result; returns how many. An
    HL7 message keeps its message control ID: the RIS sees the same message again."""
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
              destination=d.destination, **_what(d))
    return len(rows)

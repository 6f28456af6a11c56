"""What the reading room sees: studies by priority, then arrival; one study's full history."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from db.models import AuditEvent, Delivery, Instance, Job, Result, Study
from db.states import DeliveryState

PRIORITY_RANK = {"urgent": 0, "elevated": 1, "routine": 2, "not_analysable": 3}
"""Worklist order: most likely abnormal first; studies the model could not score last."""
LEVELS = tuple(PRIORITY_RANK)
_DURATION = re.compile(r"^(\d+)([smhd])$")


def parse_since(text: str, now: datetime) -> datetime:
    """``30m``, ``2h``, ``7d`` (a window back from now) or an ISO 8601 time."""
    match = _DURATION.match(text.strip())
    if match:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[match.group(2)]
        return now - timedelta(**{unit: int(match.group(1))})
    value = datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


@dataclass(frozen=True)
class WorklistEntry:
    study_id: int
    study_uid: str
    accession_number: str | None
    priority: str
    probability: float | None
    model: str
    model_validated: bool
    received_at: datetime
    scored_at: datetime
    delivery: str
    """delivered | pending | failed | not_sent (shadow mode or no destination)."""
    decision: bool | None
    deliveries: dict[str, str]
    """The same summary per delivery kind (``sr``, ``summary``, ``hl7``) the result has rows for."""

    def to_json(self, show_identifiers: bool, now: datetime) -> dict[str, Any]:
        data: dict[str, Any] = {
            "study": self.study_id, "priority": self.priority,
            "probability": None if self.probability is None else round(self.probability, 4),
            "model": self.model, "model_validated": self.model_validated,
            "received_at": self.received_at.isoformat(timespec="seconds"),
            "age_s": round((now - self.received_at).total_seconds()),
            "scored_at": self.scored_at.isoformat(timespec="seconds"), "delivery": self.delivery,
            "decision": self.decision, "deliveries": dict(self.deliveries),
        }
        if show_identifiers:
            data.update(study_uid=self.study_uid, accession_number=self.accession_number)
        return data


def _delivery_state(states: list[DeliveryState]) -> str:
    if not states:
        return "not_sent"
    for state in (DeliveryState.FAILED, DeliveryState.PENDING):
        if state in states:
            return state.value
    return DeliveryState.DELIVERED.value


def worklist(session: Session, levels: list[str] | None = None, since: datetime | None = None,
             limit: int = 200) -> list[WorklistEntry]:
    """Each study's latest result, ordered by priority then oldest arrival first."""
    latest = (sa.select(sa.func.max(Result.id).label("id")).group_by(Result.study_id)).subquery()
    rank = sa.case(PRIORITY_RANK, value=Result.priority, else_=len(PRIORITY_RANK))
    query = (sa.select(Study, Result).join(Result, Result.study_id == Study.id)
             .join(latest, latest.c.id == Result.id)
             .order_by(rank, Study.first_received_at, Study.id).limit(limit))
    if levels:
        query = query.where(Result.priority.in_(levels))
    if since is not None:
        query = query.where(Study.first_received_at >= since)
    rows = session.execute(query).all()
    states: dict[int, dict[str, list[DeliveryState]]] = {}
    if rows:
        result_ids = [r.id for _, r in rows]
        for result_id, kind, state in session.execute(
                sa.select(Delivery.result_id, Delivery.kind, Delivery.state)
                .where(Delivery.result_id.in_(result_ids))):
            states.setdefault(result_id, {}).setdefault(kind.value, []).append(state)
    return [WorklistEntry(s.id, s.study_uid, s.accession_number, r.priority, r.probability,
                          f"{r.model_name} {r.model_version}", r.model_validated, s.first_received_at,
                          r.created_at,
                          _delivery_state([x for kind in states.get(r.id, {}).values() for x in kind]),
                          r.decision,
                          {kind: _delivery_state(kind_states)
                           for kind, kind_states in sorted(states.get(r.id, {}).items())})
            for s, r in rows]


def _level_count_query(since: datetime | None) -> sa.Select[str, int]:
    latest = sa.select(sa.func.max(Result.id).label("id")).group_by(Result.study_id).subquery()
    query = (sa.select(Result.priority, sa.func.count()).join(latest, latest.c.id == Result.id)
             .group_by(Result.priority))
    if since is not None:
        query = query.join(Study, Study.id == Result.study_id).where(Study.first_received_at >= since)
    return query


def level_counts(session: Session, since: datetime | None = None) -> dict[str, int]:
    """How many studies' latest result has each priority (every level, zeros included), counting
    studies that arrived since ``since``; no limit applies."""
    counts = dict.fromkeys(LEVELS, 0)
    for priority, count in session.execute(_level_count_query(since)):
        counts[priority] = counts.get(priority, 0) + count
    return counts


@dataclass(frozen=True)
class UnscoredEntry:
    """A study with no result yet, or none at all: still arriving, queued, failed, or ignored."""

    study_id: int
    state: str
    job_state: str | None
    failure_reason: str | None
    ineligible_reasons: tuple[str, ...]
    received_at: datetime


def unscored(session: Session, since: datetime | None = None, limit: int = 200) -> list[UnscoredEntry]:
    """Studies without any result, newest arrival first, with their latest job's state and, for
    studies no job was queued for, why their instances were not eligible."""
    scored = sa.select(Result.study_id)
    query = (sa.select(Study).where(Study.id.not_in(scored))
             .order_by(Study.first_received_at.desc(), Study.id.desc()).limit(limit))
    if since is not None:
        query = query.where(Study.first_received_at >= since)
    studies = session.scalars(query).all()
    ids = [s.id for s in studies]
    jobs: dict[int, Job] = {}
    reasons: dict[int, set[str]] = {}
    if ids:
        for job in session.scalars(sa.select(Job).where(Job.study_id.in_(ids)).order_by(Job.id)):
            jobs[job.study_id] = job  # the latest job wins
        for study_id, reason in session.execute(
                sa.select(Instance.study_id, Instance.eligibility_reason)
                .where(Instance.study_id.in_(ids), Instance.eligible.is_(False)).distinct()):
            reasons.setdefault(study_id, set()).add(reason or "unknown")
    return [UnscoredEntry(s.id, s.state.value,
                          jobs[s.id].state.value if s.id in jobs else None,
                          jobs[s.id].failure_reason if s.id in jobs else None,
                          tuple(sorted(reasons.get(s.id, ()))), s.first_received_at)
            for s in studies]


def worklist_document(session: Session, levels: list[str] | None, since: datetime | None, limit: int,
                      show_identifiers: bool, now: datetime) -> dict[str, Any]:
    """The worklist as the CLI's --json and /api/v1/worklist return it; ValueError names an
    unknown level."""
    unknown = sorted(set(levels or ()) - set(LEVELS))
    if unknown:
        raise ValueError(f"unknown level {unknown[0]!r}; levels are {', '.join(LEVELS)}")
    return {"generated_at": now.isoformat(timespec="seconds"),
            "studies": [e.to_json(show_identifiers, now)
                        for e in worklist(session, levels or None, since, limit)]}


def find_study(session: Session, key: str) -> Study | None:
    """By Study Instance UID, or by the internal number the worklist shows."""
    study = session.scalar(sa.select(Study).where(Study.study_uid == key))
    if study is None and key.isdigit() and int(key) < 2**63:  # beyond: no row, nor a valid integer
        study = session.get(Study, int(key))
    return study


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat(timespec="seconds")


def detail_of(result: Result) -> dict[str, Any]:
    """The result's detail JSON; an unreadable or non-object value reads as empty."""
    try:
        value = json.loads(result.detail or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


SUMMARY_KEYS = ("image", "sop_instance_uid", "reason", "input_png", "heatmap_png")


def summary_of(detail: dict[str, Any]) -> dict[str, str | None] | None:
    """The detail's ``summary`` entry with its known keys (each a string or None), or None when
    the result has none (made before summaries existed, or by a worker that makes none)."""
    value = detail.get("summary")
    if not isinstance(value, dict):
        return None
    return {key: value[key] if isinstance(value.get(key), str) else None for key in SUMMARY_KEYS}


def study_history(session: Session, study: Study, show_identifiers: bool) -> dict[str, Any]:
    """Everything known about one study, no patient data: instances, jobs, results, deliveries
    (SR and HL7), and the audit trail in time order."""
    instances = session.scalars(sa.select(Instance).where(Instance.study_id == study.id)
                                .order_by(Instance.id)).all()
    jobs = session.scalars(sa.select(Job).where(Job.study_id == study.id).order_by(Job.id)).all()
    results = session.scalars(sa.select(Result).where(Result.study_id == study.id)
                              .order_by(Result.id)).all()
    deliveries = session.scalars(sa.select(Delivery).where(
        Delivery.result_id.in_([r.id for r in results])).order_by(Delivery.id)).all() if results else []
    events = session.scalars(sa.select(AuditEvent).where(AuditEvent.study_uid == study.study_uid)
                             .order_by(AuditEvent.at, AuditEvent.id)).all()
    data: dict[str, Any] = {
        "study": study.id, "state": study.state.value, "revision": study.revision,
        "first_received_at": _iso(study.first_received_at), "last_received_at": _iso(study.last_received_at),
        "completed_at": _iso(study.completed_at),
        "instances": [{"sop_instance_uid": i.sop_instance_uid, "modality": i.modality,
                       "view": i.view_position, "eligible": i.eligible, "reason": i.eligibility_reason,
                       "received_at": _iso(i.received_at), "receive_count": i.receive_count,
                       "held": i.spool_path is not None and i.purged_at is None,
                       "purged_at": _iso(i.purged_at), "version": i.version,
                       "content_hash": i.content_hash[:16] if i.content_hash else None,
                       "superseded_at": _iso(i.superseded_at)} for i in instances],
        "jobs": [{"id": j.id, "revision": j.study_revision, "state": j.state.value, "attempts": j.attempts,
                  "failure_reason": j.failure_reason, "last_error": j.last_error,
                  "updated_at": _iso(j.updated_at)} for j in jobs],
        "results": [{"id": r.id, "revision": r.study_revision, "model": f"{r.model_name} {r.model_version}",
                     "model_validated": r.model_validated, "probability": r.probability,
                     "decision": r.decision, "priority": r.priority,
                     "thresholds": {"decision": r.threshold, "urgent": r.urgent_threshold,
                                    "elevated": r.elevated_threshold},
                     "inference_seconds": r.inference_seconds, "sr_sop_instance_uid": r.sr_sop_instance_uid,
                     # per image: its probability, or why it was not analysable, and any notes
                     "images": detail_of(r).get("images", {}),
                     # the summary image and its previews, or why there is none (None: not made)
                     "summary": summary_of(detail_of(r)),
                     "created_at": _iso(r.created_at)} for r in results],
        # Every delivered object: the SR (kind sr) and HL7 results (kind hl7, with the message
        # control ID). The last detail stays out: it may quote the peer's free text.
        "deliveries": [{"result": d.result_id, "kind": d.kind.value, "destination": d.destination,
                        "state": d.state.value, "attempts": d.attempts,
                        "last_reason": d.last_reason, "message_control_id": d.message_control_id,
                        "delivered_at": _iso(d.delivered_at)} for d in deliveries],
        "audit": [{"at": _iso(e.at), "action": e.action.value, "actor": e.actor,
                   "sop_instance_uid": e.sop_instance_uid,
                   "detail": json.loads(e.detail) if e.detail else None} for e in events],
    }
    if show_identifiers:
        data.update(study_uid=study.study_uid, accession_number=study.accession_number)
    return data

"""Queue claims and due-delivery queries use indexes: on a database with 100,000 done jobs and
their delivered deliveries, after ANALYZE, SQLite's plan for the exact SQL that
:func:`db.jobs.claim_jobs` and :func:`db.deliveries.due` send never scans jobs or deliveries."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine

from db import deliveries, jobs, migrate
from db.engine import create_db_engine, make_session_factory, unit_of_work
from db.models import Delivery, Job, Result, Study
from db.states import DeliveryState, JobState, StudyState

DONE_JOBS = 100_000
DELIVERED = 20_000


def _fill(engine: Engine, now: datetime) -> None:
    """100,000 studies with a done job each, results and delivered deliveries for 20,000 of
    them, and the few rows a live queue has: queued (due and not yet due), running (lease
    current and expired), failed, and pending deliveries (due and not yet due)."""
    old = now - timedelta(days=30)
    total = DONE_JOBS + 6
    studies = [{"id": i, "study_uid": f"1.2.826.0.1.{i}", "state": StudyState.COMPLETE,
                "revision": 1, "first_received_at": old, "last_received_at": old,
                "completed_at": old} for i in range(1, total + 1)]
    states = [JobState.DONE] * DONE_JOBS + [JobState.QUEUED, JobState.QUEUED, JobState.RUNNING,
                                            JobState.RUNNING, JobState.FAILED, JobState.SUPERSEDED]
    job_rows: list[dict[str, Any]] = []
    for i, state in enumerate(states, start=1):
        extra = DONE_JOBS
        row = {"id": i, "study_id": i, "study_revision": 1, "state": state, "created_at": old,
               "updated_at": old, "attempts": 1, "lease_owner": None, "lease_expires_at": None,
               "next_attempt_at": None}
        if i == extra + 2:
            row["next_attempt_at"] = now + timedelta(minutes=5)  # queued, retry not yet due
        if state is JobState.RUNNING:
            row["lease_owner"] = "w"
            row["lease_expires_at"] = now + (timedelta(minutes=5) if i == extra + 3
                                             else -timedelta(minutes=1))
        job_rows.append(row)
    results = [{"id": i, "job_id": i, "study_id": i, "study_revision": 1, "model_name": "m",
                "model_version": "1", "model_validated": False, "probability": 0.5,
                "decision": True, "threshold": 0.5, "urgent_threshold": 0.9,
                "elevated_threshold": 0.5, "priority": "elevated", "inference_seconds": 0.1,
                "sr_sop_instance_uid": f"2.25.{i}", "sr_series_uid": f"2.25.9{i}",
                "sr_path": f"sr/{i}.dcm", "detail": "{}", "created_at": old}
               for i in range(1, DELIVERED + 3)]
    delivery_rows = [{"id": i, "result_id": i, "destination": "pacs",
                      "state": DeliveryState.DELIVERED, "attempts": 1, "next_attempt_at": old,
                      "created_at": old, "delivered_at": old} for i in range(1, DELIVERED + 1)]
    delivery_rows += [{"id": DELIVERED + 1, "result_id": DELIVERED + 1, "destination": "pacs",
                       "state": DeliveryState.PENDING, "attempts": 0, "next_attempt_at": old,
                       "created_at": old, "delivered_at": None},
                      {"id": DELIVERED + 2, "result_id": DELIVERED + 2, "destination": "pacs",
                       "state": DeliveryState.PENDING, "attempts": 2,
                       "next_attempt_at": now + timedelta(minutes=5), "created_at": old,
                       "delivered_at": None}]
    with engine.begin() as conn:
        for table, rows in ((Study.__table__, studies), (Job.__table__, job_rows),
                            (Result.__table__, results), (Delivery.__table__, delivery_rows)):
            conn.execute(sa.insert(table), rows)
        conn.exec_driver_sql("ANALYZE")


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Engine, datetime]]:
    path = tmp_path_factory.mktemp("plans") / "opacityd.sqlite"
    engine = create_db_engine(f"sqlite:///{path}")
    migrate.upgrade(engine)
    now = datetime.now(UTC)
    _fill(engine, now)
    yield engine, now
    engine.dispose()


def _captured(engine: Engine, run: Any) -> list[tuple[str, Any]]:
    """Every statement (with its parameters) that ``run(session)`` sends."""
    statements: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any,
                _many: bool) -> None:
        statements.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        with unit_of_work(make_session_factory(engine)) as session:
            run(session)
            session.rollback()  # the plan is what matters; leave the rows for the next test
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    return statements


def _plan(engine: Engine, statement: str, parameters: Any) -> list[str]:
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters).all()
    return [str(row[-1]) for row in rows]


def _scans(plan: list[str], table: str) -> list[str]:
    """Plan lines that read ``table`` other than by a search on an index or the primary key."""
    return [line for line in plan if line == f"SCAN {table}" or line.startswith(f"SCAN {table} ")]


def test_the_claim_candidates_are_found_through_indexes(filled: tuple[Engine, datetime]) -> None:
    engine, now = filled
    claimed: list[jobs.ClaimedJob] = []
    statements = _captured(engine, lambda s: claimed.extend(jobs.claim_jobs(
        s, "planner", timedelta(minutes=5), now, 8, max_attempts=5)))
    # The claim sees exactly the due queued job and the expired running one.
    assert sorted(c.job_id for c in claimed) == [DONE_JOBS + 1, DONE_JOBS + 4]
    candidates = [(sql, params) for sql, params in statements
                  if sql.lstrip().upper().startswith("SELECT") and "FROM jobs" in sql
                  and "UPDATE" not in sql.upper()]
    assert candidates, statements
    sql, params = candidates[0]
    plan = _plan(engine, sql, params)
    assert plan and _scans(plan, "jobs") == [], (sql, plan)
    searches = " ".join(line for line in plan if line.startswith("SEARCH jobs USING"))
    assert "ix_jobs_state_next_attempt_at" in searches, plan
    assert "ix_jobs_state_lease_expires_at" in searches, plan


def test_the_due_deliveries_are_found_through_an_index(filled: tuple[Engine, datetime]) -> None:
    engine, now = filled
    found: list[deliveries.DueDelivery] = []
    statements = _captured(engine, lambda s: found.extend(deliveries.due(s, now)))
    assert [d.delivery_id for d in found] == [DELIVERED + 1]
    (sql, params), = [(sql, p) for sql, p in statements if "FROM deliveries" in sql]
    plan = _plan(engine, sql, params)
    assert plan and _scans(plan, "deliveries") == [], (sql, plan)
    assert any(line.startswith("SEARCH deliveries USING INDEX ix_deliveries_state_next_attempt_at")
               for line in plan), plan


def test_the_plans_are_taken_on_a_full_analysed_table(filled: tuple[Engine, datetime]) -> None:
    engine, _ = filled
    with engine.connect() as conn:
        assert conn.scalar(sa.select(sa.func.count()).select_from(Job)) == DONE_JOBS + 6
        stats = conn.exec_driver_sql("SELECT tbl, idx, stat FROM sqlite_stat1").all()
    assert any(tbl == "jobs" and idx == "ix_jobs_state_next_attempt_at" for tbl, idx, _ in stats)

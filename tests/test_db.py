"""Storage: migrations, SQLite settings, state transitions and study completion."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from daemon.cli import main
from db import migrate, queue
from db.engine import create_db_engine, make_session_factory, sqlite_pragmas, unit_of_work
from db.exceptions import InvalidTransition
from db.models import Instance, Job, Study
from db.states import JobState, StudyState, check_transition

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def sessions(database_url: str):  # type: ignore[no-untyped-def]
    """A migrated database on each engine (tests/conftest.py: ``database_url``)."""
    engine = create_db_engine(database_url)
    migrate.upgrade(engine)
    yield make_session_factory(engine)
    engine.dispose()


def _record(study: str, sop: str, eligible: bool = True) -> queue.InstanceRecord:
    return queue.InstanceRecord(
        study_uid=study, series_uid="1.2.3", sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
        transfer_syntax_uid="1.2.840.10008.1.2.1", modality="CR", body_part="CHEST",
        view_position="PA" if eligible else "LL", accession_number=None, eligible=eligible,
        eligibility_reason="eligible" if eligible else "lateral_view",
        spool_path=None, size_bytes=10, calling_ae="TEST")


def test_migrations_create_the_schema_and_are_idempotent(database_url: str) -> None:
    engine = create_db_engine(database_url)
    assert migrate.current_revision(engine) is None
    assert migrate.upgrade(engine) == (None, migrate.head_revision())
    assert migrate.upgrade(engine) == (migrate.head_revision(), migrate.head_revision())
    tables = set(sa.inspect(engine).get_table_names())
    assert {"studies", "instances", "jobs", "audit_events", "alembic_version"} <= tables
    engine.dispose()


def test_db_upgrade_command(tmp_path: Path, database_url: str,
                            capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[paths]\nstate_dir = "{tmp_path / "s"}"\n[database]\nurl = "{database_url}"\n')
    assert main(["--config", str(cfg), "db", "upgrade"]) == 0
    head = migrate.head_revision()
    assert f"empty -> {head}" in capsys.readouterr().out
    assert main(["--config", str(cfg), "db", "upgrade"]) == 0
    assert f"already at {head}" in capsys.readouterr().out


def test_sqlite_runs_in_wal_with_full_sync_foreign_keys_and_busy_timeout(tmp_path: Path) -> None:
    engine = create_db_engine(f"sqlite:///{tmp_path / 'p.sqlite3'}", busy_timeout_ms=1234)
    assert sqlite_pragmas(engine) == {"journal_mode": "wal", "synchronous": 2, "foreign_keys": 1,
                                      "busy_timeout": 1234}
    engine.dispose()


def test_invalid_transitions_are_refused() -> None:
    check_transition(JobState.QUEUED, JobState.RUNNING)
    with pytest.raises(InvalidTransition, match="done -> running"):
        check_transition(JobState.DONE, JobState.RUNNING)
    with pytest.raises(InvalidTransition, match="complete -> ignored"):
        check_transition(StudyState.COMPLETE, StudyState.IGNORED)


def test_a_study_is_completed_only_after_its_quiet_period(sessions) -> None:  # type: ignore[no-untyped-def]
    with unit_of_work(sessions) as s:
        queue.record_instance(s, _record("1.1", "1.1.1"), NOW)
    with unit_of_work(sessions) as s:
        assert queue.complete_quiet_studies(s, timedelta(seconds=5), NOW + timedelta(seconds=4)) == []
    with unit_of_work(sessions) as s:
        (done,) = queue.complete_quiet_studies(s, timedelta(seconds=5), NOW + timedelta(seconds=5))
    assert done.state is StudyState.COMPLETE and done.job_id is not None


def test_a_study_without_eligible_images_is_ignored_without_a_job(sessions) -> None:  # type: ignore[no-untyped-def]
    with unit_of_work(sessions) as s:
        queue.record_instance(s, _record("2.1", "2.1.1", eligible=False), NOW)
        (done,) = queue.complete_quiet_studies(s, timedelta(seconds=1), NOW + timedelta(seconds=2))
        assert done.state is StudyState.IGNORED and done.job_id is None
        assert s.scalar(sa.select(sa.func.count()).select_from(Job)) == 0


def test_concurrent_schedulers_enqueue_exactly_one_job(sessions) -> None:  # type: ignore[no-untyped-def]
    with unit_of_work(sessions) as s:
        for i in range(20):
            queue.record_instance(s, _record(f"3.{i}", f"3.{i}.1"), NOW)
    barrier = threading.Barrier(4)
    results: list[int] = []

    def tick() -> None:
        barrier.wait()
        with unit_of_work(sessions) as s:
            results.append(len(queue.complete_quiet_studies(s, timedelta(seconds=1),
                                                            NOW + timedelta(seconds=2))))
    threads = [threading.Thread(target=tick) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(results) == 20
    with unit_of_work(sessions) as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(Job)) == 20
        assert set(s.scalars(sa.select(Study.state))) == {StudyState.COMPLETE}


def test_receivers_racing_on_the_same_instances_record_each_once(sessions) -> None:  # type: ignore[no-untyped-def]
    """Four receivers (threads, each its own connection) file the same 30 instances at once,
    new studies and existing ones mixed: each instance ends as one row, recorded NEW once and
    DUPLICATE by the others, and each study once."""
    with unit_of_work(sessions) as s:
        for i in range(0, 30, 2):  # half the studies exist already
            queue.record_instance(s, _record(f"5.{i}", f"5.{i}.0"), NOW)
    records = [_record(f"5.{i}", f"5.{i}.1") for i in range(30)]
    barrier = threading.Barrier(4)
    outcomes: list[queue.StoreOutcome] = []
    lock = threading.Lock()

    def receiver(offset: int) -> None:
        barrier.wait()
        for rec in records[offset:] + records[:offset]:
            with unit_of_work(sessions) as s:
                stored = queue.record_instance(s, rec, NOW + timedelta(seconds=1))
            with lock:
                outcomes.append(stored.outcome)
    threads = [threading.Thread(target=receiver, args=(k * 7,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count(queue.StoreOutcome.NEW) == 30
    assert outcomes.count(queue.StoreOutcome.DUPLICATE) == 90
    with unit_of_work(sessions) as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(Instance)) == 45
        assert s.scalar(sa.select(sa.func.count()).select_from(Study)) == 30
        assert s.scalar(sa.select(sa.func.sum(Instance.receive_count))
                        .where(Instance.sop_instance_uid.like("%.1"))) == 120


def test_processes_starting_together_on_an_empty_database_migrate_it_once(database_url: str) -> None:
    """Several receivers and workers started at once on a new database: one migrates, the
    others wait for it and find the schema at head (no duplicate CREATE TABLE)."""
    engines = [create_db_engine(database_url) for _ in range(4)]
    barrier = threading.Barrier(len(engines))
    outcomes: list[tuple[str | None, str | None]] = []
    errors: list[BaseException] = []

    def start(engine) -> None:  # type: ignore[no-untyped-def]
        barrier.wait()
        try:
            outcomes.append(migrate.upgrade(engine))
        except Exception as e:  # noqa: BLE001 - the starting thread's boundary: collected for the assertion below
            errors.append(e)
    threads = [threading.Thread(target=start, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for engine in engines:
        engine.dispose()
    head = migrate.head_revision()
    assert errors == []
    assert sorted(outcomes, key=str) == sorted([(None, head)] + [(head, head)] * 3, key=str)

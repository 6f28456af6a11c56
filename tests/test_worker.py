"""The worker in-process against a real SQLite file: claims, rescoring, failures, two workers."""

from __future__ import annotations

import dataclasses
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pydicom
import pytest
import sqlalchemy as sa

from daemon.cli import main
from daemon.config import load_config
from daemon.scheduler import complete_studies
from daemon.worker import Worker
from db import jobs
from db.engine import unit_of_work
from db.models import AuditEvent, Job, Result
from db.states import AuditAction, JobState
from model.predictor import Predictor
from tests.conftest import Harness, running_receiver, wait_until
from tests.factories import make_dx


@pytest.fixture(scope="module")
def predictor(demo_bundle: Path) -> Predictor:
    return Predictor(demo_bundle)




def _close_studies(h: Harness) -> None:
    complete_studies(h.sessions, timedelta(seconds=0))


def _worker(h: Harness, predictor: Predictor, owner: str, batch_size: int = 8) -> Worker:
    config = load_config(h.config.source, env={})
    config = dataclasses.replace(config, worker=dataclasses.replace(config.worker,
                                                                    batch_size=batch_size))
    return Worker(config, h.sessions, predictor, h.spool, owner=owner)


def _count(h: Harness, model: type, *where: sa.ColumnElement[bool]) -> int:
    return int(h.query(lambda s: s.scalar(sa.select(sa.func.count()).select_from(model).where(*where))))


def test_two_workers_on_one_database_score_each_job_exactly_once(tmp_path: Path,
                                                                 predictor: Predictor) -> None:
    with running_receiver(tmp_path, quiet_s=600) as h:
        h.store(*[make_dx(96, 96, seed=i) for i in range(12)])
        _close_studies(h)
        assert _count(h, Job) == 12
        workers = [_worker(h, predictor, f"w{i}", batch_size=2) for i in range(2)]

        def drain(w: Worker) -> None:
            while w.run_once():
                pass
        threads = [threading.Thread(target=drain, args=(w,)) for w in workers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert _count(h, Result) == 12
        assert _count(h, Job, Job.state == JobState.DONE) == 12
        claims = h.query(lambda s: s.execute(
            sa.select(AuditEvent.actor, sa.func.count()).where(
                AuditEvent.action == AuditAction.JOB_CLAIMED).group_by(AuditEvent.actor)).all())
        assert sum(n for _, n in claims) == 12  # no job was claimed twice
        assert {actor for actor, _ in claims} == {"w0", "w1"}


def test_the_run_loop_scores_the_next_batch_while_one_settles_and_stop_settles_all_it_holds(
        tmp_path: Path, predictor: Predictor, monkeypatch: pytest.MonkeyPatch) -> None:
    with running_receiver(tmp_path, quiet_s=600) as h:
        h.store(*[make_dx(96, 96, seed=i) for i in range(6)])
        _close_studies(h)
        worker = _worker(h, predictor, "w", batch_size=2)
        settle = worker._settle
        held, release = threading.Event(), threading.Event()

        def held_settle(batch: object) -> None:
            held.set()
            release.wait(timeout=120)
            settle(batch)  # type: ignore[arg-type]
        monkeypatch.setattr(worker, "_settle", held_settle)
        stop = threading.Event()
        loop = threading.Thread(target=worker.run, args=(stop,))
        loop.start()
        try:
            assert held.wait(timeout=120)
            # The first batch's results are held back; meanwhile the loop claimed the next two
            # batches (one scored and waiting to settle, one preprocessing).
            wait_until(lambda: _count(h, Job, Job.state == JobState.RUNNING) == 6, timeout=120,
                       what="every job claimed while the first batch settles")
            assert _count(h, Result) == 0
            stop.set()  # as the first SIGTERM: claim nothing more, settle what is held
        finally:
            release.set()
            loop.join(timeout=300)
        assert not loop.is_alive()
        assert _count(h, Job, Job.state == JobState.DONE, Job.attempts == 1) == 6
        assert _count(h, Result) == 6
        assert len(list(h.spool.root.glob("sr/*/*.dcm"))) == 6


def test_late_lateral_changes_nothing_and_late_frontal_supersedes_in_the_same_series(
        tmp_path: Path, predictor: Predictor) -> None:
    with running_receiver(tmp_path, quiet_s=600) as h:
        worker = _worker(h, predictor, "w")
        pa = make_dx(96, 96)
        h.store(pa)
        _close_studies(h)
        worker.run_once()
        # A late lateral is recorded but does not re-open the study: nothing is scored again.
        h.store(make_dx(96, 96, study_uid=pa.StudyInstanceUID, view="LL", seed=5))
        _close_studies(h)
        worker.run_once()
        assert _count(h, Job, Job.state == JobState.DONE) == 1
        assert _count(h, Result) == 1
        # A late frontal image changes the evidence: a new SR in the same series, superseding.
        h.store(make_dx(96, 96, study_uid=pa.StudyInstanceUID, seed=6))
        _close_studies(h)
        worker.run_once()
        first, second = h.query(lambda s: list(s.scalars(sa.select(Result).order_by(Result.id))))
        assert second.sr_series_uid == first.sr_series_uid
        assert second.sr_sop_instance_uid != first.sr_sop_instance_uid
        sr = pydicom.dcmread(h.spool.absolute(second.sr_path))
        predecessor = sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
        assert predecessor.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first.sr_sop_instance_uid


def test_unreadable_images_give_a_not_analysable_result(tmp_path: Path, predictor: Predictor) -> None:
    with running_receiver(tmp_path, quiet_s=600) as h:
        blank = make_dx(96, 96)
        blank.PixelData = bytes(96 * 96 * 2)
        h.store(blank)
        _close_studies(h)
        _worker(h, predictor, "w").run_once()
        (result,) = h.query(lambda s: list(s.scalars(sa.select(Result))))
        assert result.priority == "not_analysable" and result.probability is None
        assert '"refused": "blank_image"' in result.detail


def test_vanished_spool_file_fails_the_job_with_a_readable_reason(tmp_path: Path,
                                                                  predictor: Predictor) -> None:
    with running_receiver(tmp_path, quiet_s=600) as h:
        ds = make_dx(96, 96)
        h.store(ds)
        _close_studies(h)
        for path in h.spool.root.rglob("*.dcm"):
            path.unlink()
        _worker(h, predictor, "w").run_once()
        (job,) = h.query(lambda s: list(s.scalars(sa.select(Job))))
        assert job.state == JobState.FAILED
        assert job.failure_reason == "spool_file_missing"  # the spool is mounted: the file is gone
        assert job.last_error == f"spooled instances missing: {ds.SOPInstanceUID}"
        assert _count(h, Result) == 0


def test_failed_job_keeps_its_reason_and_can_be_requeued(tmp_path: Path) -> None:
    with running_receiver(tmp_path, quiet_s=600) as h:
        h.store(make_dx(96, 96))
        _close_studies(h)
        now = datetime.now(UTC)
        with unit_of_work(h.sessions) as s:
            (claimed,) = jobs.claim_jobs(s, "w", timedelta(seconds=60), now, 1)
        with unit_of_work(h.sessions) as s:
            state = jobs.fail_job(s, claimed, "w", "ValueError: bad", transient=False, now=now,
                                  max_attempts=5, retry_in=timedelta(seconds=1))
        assert state == JobState.FAILED
        (job,) = h.query(lambda s: list(s.scalars(sa.select(Job))))
        assert job.last_error == "ValueError: bad"
        assert main(["--config", h.config.source, "requeue", "--failed"]) == 0
        assert h.query(lambda s: s.scalar(sa.select(Job.state))) == JobState.QUEUED


def test_transient_failure_retries_with_backoff_then_fails(tmp_path: Path) -> None:
    with running_receiver(tmp_path, quiet_s=600) as h:
        h.store(make_dx(96, 96))
        _close_studies(h)
        now = datetime.now(UTC)
        states = []
        for attempt in range(3):
            at = now + timedelta(seconds=10 * attempt)
            with unit_of_work(h.sessions) as s:
                (claimed,) = jobs.claim_jobs(s, "w", timedelta(seconds=60), at, 1)
                assert claimed.attempts == attempt + 1
            with unit_of_work(h.sessions) as s:
                states.append(jobs.fail_job(s, claimed, "w", "database is locked", transient=True,
                                            now=at, max_attempts=3, retry_in=timedelta(seconds=5)))
            with unit_of_work(h.sessions) as s:
                assert jobs.claim_jobs(s, "x", timedelta(seconds=60), at, 1) == []  # not due yet
        assert states == [JobState.QUEUED, JobState.QUEUED, JobState.FAILED]

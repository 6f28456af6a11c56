"""`opacityd worker` as its own process, and the test's view of the database, for tests that
drive the real worker (tests/test_worker_faults.py, tests/test_header_slips.py)."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from daemon.config import Config, load_config
from db.engine import create_db_engine, make_session_factory, unit_of_work
from db.models import Delivery, Job, Study
from db.states import DeliveryState, JobState
from tests.conftest import OPACITYD


class WorkerProcess:
    """`opacityd worker` as its own process (``worker.embedded = false`` in the config)."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config, self.log_path = config, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([OPACITYD, "--config", str(self.config), "worker"],
                                         stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)

    def ensure_stopped(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(timeout=30)


@pytest.fixture
def workers() -> Iterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    yield started
    for w in started:
        w.ensure_stopped()


@dataclasses.dataclass
class Db:
    config: Config
    sessions: sessionmaker[Session]

    def query(self, statement: Any) -> list[Any]:
        with unit_of_work(self.sessions) as s:
            return list(s.execute(statement).all())

    def jobs(self) -> dict[str, tuple[JobState, str | None, str | None, int]]:
        """study UID -> (state, failure_reason, last_error, attempts) of its latest job."""
        rows = self.query(sa.select(Study.study_uid, Job.state, Job.failure_reason, Job.last_error,
                                    Job.attempts).join(Study, Study.id == Job.study_id)
                          .order_by(Job.id))
        return {uid: (state, reason, error, attempts) for uid, state, reason, error, attempts in rows}

    def settled(self, studies: int) -> bool:
        """Every one of ``studies`` jobs is done or failed, and every delivery delivered."""
        jobs = self.jobs()
        deliveries = self.query(sa.select(Delivery.state))
        return (len(jobs) == studies
                and all(state in (JobState.DONE, JobState.FAILED) for state, *_ in jobs.values())
                and all(state == DeliveryState.DELIVERED for (state,) in deliveries))


@pytest.fixture
def db_of() -> Iterator[Any]:
    engines: list[Any] = []

    def open_db(cfg: Path) -> Db:
        config = load_config(cfg, env={})
        engine = create_db_engine(config.database_url)
        engines.append(engine)
        return Db(config, make_session_factory(engine))
    yield open_db
    for engine in engines:
        engine.dispose()

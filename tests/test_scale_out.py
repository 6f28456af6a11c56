"""Scale-out on PostgreSQL: several `serve` processes and several `opacityd worker` processes on
one database and one spool, with a real PACS (DCMTK storescp), faults included.

The database is a real PostgreSQL 15 (tests/pg.py); the processes are the real commands."""

from __future__ import annotations

import collections
import json
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pydicom
import pytest
import sqlalchemy as sa

from daemon.config import load_config
from db.engine import create_db_engine, make_session_factory, read_only
from db.locks import exclusive
from db.models import AuditEvent, Delivery, Instance, Job, Result, Study
from db.states import AuditAction, DeliveryState, JobState
from tests.conftest import (
    OPACITYD,
    Pacs,
    free_port,
    storescu,
    wait_until,
    write_config,
)
from tests.daemon_process import DaemonProcess
from tests.factories import make_dx
from tests.pg import PostgresCluster
from tests.worker_process import WorkerProcess


def _settings(pacs: Pacs, quiet_s: float) -> str:
    return (f'[[destinations]]\nname = "pacs"\nhost = "127.0.0.1"\nport = {pacs.port}\n'
            'called_ae = "PACS"\ncalling_ae = "OPACITYD"\n'
            '[delivery]\npoll_interval_s = 0.2\nretry_base_s = 0.3\nretry_max_s = 1.0\n'
            '[worker]\nembedded = false\npoll_interval_s = 0.2\nlease_s = 5.0\nbatch_size = 8\n'
            'retry_base_s = 0.3\nretry_max_s = 2.0\n')


class Site:
    """``receivers`` serve processes (two ports, one AE title) and ``workers`` worker processes
    sharing one PostgreSQL database and one spool."""

    def __init__(self, tmp_path: Path, database_url: str, pacs: Pacs, bundle: Path,
                 receivers: int, quiet_s: float = 3.0) -> None:
        self.tmp_path = tmp_path
        self.state = tmp_path / "shared-state"
        self.configs = [write_config(tmp_path / f"serve{i}", _settings(pacs, quiet_s),
                                     quiet_s=quiet_s, bundle=bundle, database_url=database_url,
                                     state_dir=self.state)
                        for i in range(receivers)]
        self.config = load_config(self.configs[0], env={})
        self.serves: list[DaemonProcess] = []
        self.workers: list[WorkerProcess] = []
        self.engine = create_db_engine(database_url)
        self.sessions = make_session_factory(self.engine)

    def start(self, workers: int) -> Site:
        for i, cfg in enumerate(self.configs):
            port = load_config(cfg, env={}).receiver.port
            self.serves.append(DaemonProcess(cfg, self.tmp_path / f"serve{i}.log", port).start())
        for i in range(workers):
            self.add_worker(i)
        return self

    def add_worker(self, i: int) -> WorkerProcess:
        worker = WorkerProcess(self.configs[i % len(self.configs)],
                               self.tmp_path / f"worker{i}.log").start()
        self.workers.append(worker)
        return worker

    def query(self, statement: Any) -> list[Any]:
        with read_only(self.sessions) as s:
            return list(s.execute(statement).all())

    def close(self) -> None:
        for process in [*self.workers, *self.serves]:
            process.ensure_stopped()
        self.engine.dispose()


@pytest.fixture
def pacs(tmp_path: Path) -> Any:
    """storescp keeping a new file per receipt (+uf), so an SR received twice is seen twice."""
    p = Pacs(tmp_path / "pacs", free_port(), options=("+uf",)).start()
    yield p
    p.stop()


def _srs_per_study(pacs: Pacs) -> collections.Counter[str]:
    found: collections.Counter[str] = collections.Counter()
    for path in pacs.srs():
        found[str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)] += 1
    return found


def _write(folder: Path, name: str, ds: pydicom.Dataset) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    ds.save_as(path, enforce_file_format=True)
    return path


def _send_parallel(sends: list[tuple[int, list[Path]]]) -> dict[Path, str]:
    """One storescu association per (port, files), all at once; every file's response."""
    acks: dict[Path, str] = {}
    lock = threading.Lock()

    def send(port: int, files: list[Path]) -> None:
        _, got = storescu(port, files, timeout=300)
        with lock:
            acks.update(got)
    threads = [threading.Thread(target=send, args=item) for item in sends]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return acks


def test_two_receivers_and_three_workers_on_postgresql_score_each_study_once_through_a_worker_kill(
        tmp_path: Path, pg_cluster: PostgresCluster, pacs: Pacs, demo_bundle: Path) -> None:
    """100 studies through 2 `serve` (one spool, one database) and 3 `opacityd worker`:
    a third of the studies split across both receivers, a fifth with one instance sent to both
    at once; one worker killed with -9 mid-run. Every study gets exactly one SR at the PACS,
    every acknowledged instance is held once, no job gets two results."""
    site = Site(tmp_path, pg_cluster.new_database(), pacs, demo_bundle, receivers=2)
    try:
        site.start(workers=3)
        a, b = (serve.port for serve in site.serves)
        to_a: list[Path] = []
        to_b: list[Path] = []
        studies: list[str] = []
        instances: set[str] = set()
        inbox = tmp_path / "in"
        for i in range(100):
            first = make_dx(48, 48, seed=i)
            second = make_dx(48, 48, seed=1000 + i, study_uid=first.StudyInstanceUID,
                             series_uid=first.SeriesInstanceUID)
            studies.append(str(first.StudyInstanceUID))
            instances |= {str(first.SOPInstanceUID), str(second.SOPInstanceUID)}
            p1, p2 = _write(inbox, f"{i:03d}a.dcm", first), _write(inbox, f"{i:03d}b.dcm", second)
            if i % 3 == 0:  # split: one instance through each receiver
                to_a.append(p1)
                to_b.append(p2)
            else:
                (to_a if i % 2 else to_b).extend([p1, p2])
            if i % 5 == 0:  # the same instance through the other receiver too, at the same time
                dup = _write(inbox / "dup", f"{i:03d}a.dcm", first)
                (to_b if p1 in to_a else to_a).append(dup)
        half_a, half_b = len(to_a) // 2, len(to_b) // 2
        acks = _send_parallel([(a, to_a[:half_a]), (b, to_b[:half_b]),
                               (a, to_a[half_a:]), (b, to_b[half_b:])])
        assert len(acks) == len(to_a) + len(to_b) and set(acks.values()) == {"Success"}

        def results() -> int:
            return int(site.query(sa.select(sa.func.count()).select_from(Result))[0][0])
        wait_until(lambda: results() >= 10, timeout=300, interval=0.2, what="some studies scored")
        victim = site.workers[0]
        assert victim.proc is not None
        owner = f":{victim.proc.pid}:"

        def victim_holds_a_job() -> bool:
            return bool(site.query(sa.select(Job.id).where(Job.state == JobState.RUNNING,
                                                           Job.lease_owner.contains(owner))))
        wait_until(victim_holds_a_job, timeout=300, interval=0.01, what="a job held by the victim")
        victim.kill9()
        wait_until(lambda: results() == 100, timeout=600, interval=0.5,
                   what="every study scored after a worker was killed")
        wait_until(lambda: sum(_srs_per_study(pacs).values()) >= 100, timeout=300, interval=0.5,
                   what="100 SRs at the PACS")

        # Every acknowledged instance: one current row, its file in the shared spool.
        rows = site.query(sa.select(Instance.sop_instance_uid, Instance.spool_path)
                          .where(Instance.superseded_at.is_(None)))
        assert sorted(uid for uid, _ in rows) == sorted(instances)
        assert all((site.config.spool_dir / str(path)).is_file() for _, path in rows)
        duplicates = site.query(sa.select(sa.func.count()).select_from(AuditEvent)
                                .where(AuditEvent.action == AuditAction.INSTANCE_DUPLICATE))
        assert duplicates[0][0] == 20
        # One job per study (split studies included), one result per job, one SR per study.
        per_study = site.query(sa.select(Study.study_uid, sa.func.count(Job.id))
                               .join(Job, Job.study_id == Study.id).group_by(Study.study_uid))
        assert dict(per_study) == {uid: 1 for uid in studies}
        assert site.query(sa.select(Job.state).distinct()) == [(JobState.DONE,)]
        per_job = site.query(sa.select(Result.job_id, sa.func.count()).group_by(Result.job_id))
        assert len(per_job) == 100 and {n for _, n in per_job} == {1}
        wait_until(lambda: site.query(sa.select(Delivery.state).distinct())
                   == [(DeliveryState.DELIVERED,)], timeout=120, what="every delivery recorded")
        assert _srs_per_study(pacs) == {uid: 1 for uid in studies}
        # The kill happened mid-run: at least one job was claimed twice, none scored twice.
        claims = site.query(sa.select(sa.func.count()).select_from(AuditEvent)
                            .where(AuditEvent.action == AuditAction.JOB_CLAIMED))[0][0]
        assert claims > 100
        for worker in site.workers[1:]:
            assert worker.terminate() == 0
        for serve in site.serves:
            assert serve.terminate() == 0
    finally:
        site.close()


def _status(port: int, path: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_postgresql_stopped_and_restarted_mid_stream_loses_nothing_acknowledged(
        tmp_path: Path, own_pg_cluster: PostgresCluster, pacs: Pacs, demo_bundle: Path) -> None:
    """While the server is down: C-STORE answers 0xA700, /readyz names the database, the worker
    waits; after it returns, everything resumes by itself and every acknowledged instance is
    scored and reported."""
    site = Site(tmp_path, own_pg_cluster.new_database(), pacs, demo_bundle, receivers=1,
                quiet_s=1.0)
    try:
        site.start(workers=1)
        (serve,) = site.serves
        http_port = load_config(site.configs[0], env={}).http.port
        before = [_write(tmp_path / "before", f"{i}.dcm", make_dx(48, 48, seed=i)) for i in range(5)]
        _, acks = storescu(serve.port, before)
        assert set(acks.values()) == {"Success"}
        (worker,) = site.workers
        wait_until(lambda: '"worker_started"' in worker.log_path.read_text(errors="replace"),
                   timeout=120, what="the worker to start")

        own_pg_cluster.stop("immediate")  # as a crash: no clean shutdown
        during = [_write(tmp_path / "during", f"{i}.dcm", make_dx(48, 48, seed=100 + i))
                  for i in range(3)]
        _, acks = storescu(serve.port, during, "--no-halt")
        assert set(acks.values()) == {"Refused: OutOfResources"}
        code, ready = _status(http_port, "/readyz")
        assert code == 503 and "database" in ready["failed"]
        wait_until(lambda: any(e.get("reason") == "database" for e in _events(worker.log_path)),
                   timeout=60, what="the worker to say it waits for the database")

        own_pg_cluster.start()
        wait_until(lambda: _status(http_port, "/readyz")[0] == 200, timeout=60,
                   what="/readyz to recover")
        after = [_write(tmp_path / "after", f"{i}.dcm", make_dx(48, 48, seed=200 + i)) for i in range(3)]
        _, acks = storescu(serve.port, [*during, *after])
        assert set(acks.values()) == {"Success"}
        acknowledged = {str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID)
                        for p in [*before, *during, *after]}
        wait_until(lambda: set(_srs_per_study(pacs)) == acknowledged, timeout=300, interval=0.5,
                   what="an SR for every acknowledged study")
        assert _srs_per_study(pacs) == {uid: 1 for uid in acknowledged}
        assert worker.alive() and serve.proc is not None and serve.proc.poll() is None
        assert worker.terminate() == 0 and serve.terminate() == 0
    finally:
        site.close()


def _events(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text(errors="replace").splitlines()
            if line.startswith("{") and '"worker_waiting"' in line]


def test_serve_and_worker_refuse_to_start_on_an_unreachable_database_with_one_clear_line(
        tmp_path: Path, demo_bundle: Path) -> None:
    port = free_port()  # nothing listens there
    url = f"postgresql+psycopg://opacityd:s3cret-pw@127.0.0.1:{port}/opacityd"
    shown = f"postgresql+psycopg://opacityd:***@127.0.0.1:{port}/opacityd"
    cfg = write_config(tmp_path / "d", "[worker]\nembedded = false\n", database_url=url,
                       bundle=demo_bundle)
    for command in (["serve"], ["worker"], ["db", "upgrade"], ["status"]):
        proc = subprocess.run([OPACITYD, "--config", str(cfg), *command], capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 2, (command, proc.stdout, proc.stderr)
        assert "s3cret-pw" not in proc.stdout + proc.stderr
        (line,) = [line for line in proc.stderr.splitlines() if line.startswith("opacityd:")]
        assert line.startswith(f"opacityd: cannot reach the database at {shown}: "), line
        assert "Connection refused" in line or "connection" in line.lower()


@pytest.mark.parametrize("engine_name", ["sqlite", "postgresql"])
def test_a_named_lock_is_held_by_one_process_at_a_time(
        engine_name: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if engine_name == "sqlite":
        url = f"sqlite:///{tmp_path / 'l.sqlite3'}"
    else:
        url = request.getfixturevalue("pg_cluster").new_database()
    first, second = create_db_engine(url), create_db_engine(url)  # as two processes
    try:
        with exclusive(first, "retention") as held:
            assert held
            with exclusive(second, "retention") as other:
                assert not other
            with exclusive(second, "another") as unrelated:
                assert unrelated
        with exclusive(second, "retention") as after:
            assert after
    finally:
        first.dispose()
        second.dispose()


def test_every_operator_command_works_on_postgresql(
        tmp_path: Path, pg_cluster: PostgresCluster, pacs: Pacs, demo_bundle: Path) -> None:
    site = Site(tmp_path, pg_cluster.new_database(), pacs, demo_bundle, receivers=1, quiet_s=0.5)
    try:
        site.start(workers=1)
        ds = make_dx(48, 48, seed=7)
        _, acks = storescu(site.serves[0].port, [_write(tmp_path / "in", "a.dcm", ds)])
        assert set(acks.values()) == {"Success"}
        study = str(ds.StudyInstanceUID)
        wait_until(lambda: _srs_per_study(pacs) == {study: 1}, timeout=120, what="the SR")

        def run(*argv: str) -> str:
            proc = subprocess.run([OPACITYD, "--config", str(site.configs[0]), *argv],
                                  capture_output=True, text=True, timeout=120)
            assert proc.returncode == 0, (argv, proc.stdout, proc.stderr)
            return proc.stdout
        assert "already at" in run("db", "upgrade")
        assert "done" in run("status")
        assert study[:20] in run("studies")
        assert run("worklist", "--json").strip().startswith("{")
        assert "job_claimed" in run("audit", study)
        run("deliveries")
        run("purge", "--dry-run")
        run("resend", study)
        wait_until(lambda: _srs_per_study(pacs) == {study: 2}, timeout=60, what="the SR re-sent")
        run("requeue", "--failed")
    finally:
        site.close()

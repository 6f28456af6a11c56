"""Faults inside the worker, with the real `opacityd serve` / `opacityd worker` processes and real
peers (DCMTK storescu as modality, storescp as PACS): a network that raises on one image, an SR
builder that raises on a header, a full disk when the SR is written, a spool file corrupted after
its acknowledgement, kill -9 of the worker while it writes SRs, and a worker that vanishes on
every attempt. Each time the worker goes on, every other study ends with exactly one SR at the
PACS, and the faulty one with a recorded reason (never a header value)."""

from __future__ import annotations

import collections
import dataclasses
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import sqlalchemy as sa
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE

from daemon.config import Config, load_config
from db.engine import unit_of_work
from db.models import AuditEvent, Instance, Job, Result
from db.states import AuditAction, JobState
from tests.conftest import Pacs, free_port, log_events, mounted_tmpfs, storescu, wait_until
from tests.daemon_process import DaemonProcess, start_daemon
from tests.factories import SENTINEL_PHI, make_dx
from tests.worker_process import Db, WorkerProcess

SIZE = 71
MARKER_CORNER = 24
"""A marked image has its top-left MARKER_CORNER x MARKER_CORNER pixels at full intensity."""


@pytest.fixture(scope="session")
def faulty_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real, loadable bundle whose network raises on a marked image.

    Only standard Keras layers: the mean of the input's top-left corner picks a row of an
    Embedding of 10 rows. After equalize_hist a marked image's corner is the brightest part of
    the image (network input 1.0, row 10: out of range), and TensorFlow's gather on CPU raises
    InvalidArgumentError. Unmarked images give rows 0..9; their score comes from the other branch.
    """
    import keras

    from model.bundle import save_bundle
    from model.preprocess import PreprocessSpec

    keras.utils.set_random_seed(0)
    inputs = keras.Input(shape=(SIZE, SIZE, 3), name="image")
    logits = keras.layers.Dense(2, name="logits")(keras.layers.GlobalAveragePooling2D()(inputs))
    corner = keras.layers.Cropping2D(((0, SIZE - 4), (0, SIZE - 4)), name="corner")(inputs)
    corner = keras.layers.GlobalAveragePooling2D(name="corner_mean")(corner)
    row = keras.layers.Rescaling(scale=5.0, offset=5.5, name="marker_row")(corner)
    trap = keras.layers.Flatten()(keras.layers.Embedding(10, 2, name="marker_trap")(row))
    trap = keras.layers.Dense(2, kernel_initializer="zeros", use_bias=False, name="trap_out")(trap)
    outputs = keras.layers.Activation("softmax", name="probabilities")(
        keras.layers.Add()([logits, trap]))
    bundle = tmp_path_factory.mktemp("faulty") / "bundle"
    save_bundle(keras.Model(inputs, outputs), bundle, name="opacity-faulty-TEST", version="0.0.1",
                spec=dataclasses.replace(PreprocessSpec(), input_size=SIZE))
    return bundle


def _marked(seed: int) -> pydicom.Dataset:
    ds = make_dx(128, 128, seed=seed)
    pixels = np.frombuffer(ds.PixelData, dtype=np.uint16).reshape(128, 128).copy()
    pixels[:MARKER_CORNER, :MARKER_CORNER] = 0xFFFF
    ds.PixelData = pixels.tobytes()
    return ds


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[Pacs]:
    """storescp keeping a new file per receipt (+uf), so an SR received twice is seen twice."""
    p = Pacs(tmp_path / "pacs", free_port(), options=("+uf",)).start()
    yield p
    p.stop()


def _extra(pacs: Pacs, receiver: str = "", **worker: object) -> str:
    settings = {"poll_interval_s": 0.2, "lease_s": 30.0, "retry_base_s": 0.3, "retry_max_s": 1.0,
                "restart_base_s": 0.3, "restart_max_s": 30.0, **worker}
    lines = "\n".join(f"{key} = {json.dumps(value)}" for key, value in settings.items())
    return (f"{receiver}\n[[destinations]]\nname = \"pacs\"\nhost = \"127.0.0.1\"\n"
            f"port = {pacs.port}\ncalled_ae = \"PACS\"\ncalling_ae = \"OPACITYD\"\n"
            "[delivery]\npoll_interval_s = 0.2\nretry_base_s = 0.3\nretry_max_s = 1.0\n"
            f"[worker]\n{lines}\n")


def _store(port: int, folder: Path, datasets: list[pydicom.Dataset]) -> None:
    """Send ``datasets`` in one association with DCMTK storescu; all must be acknowledged."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(datasets):
        path = folder / f"{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    _, acks = storescu(port, paths)
    assert acks == {path: "Success" for path in paths}


def _srs_at(pacs: Pacs) -> collections.Counter[str]:
    """How many SR files the PACS holds per study."""
    found: collections.Counter[str] = collections.Counter()
    for path in pacs.folder.iterdir():
        if path.is_file():
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            if ds.Modality == "SR":
                found[str(ds.StudyInstanceUID)] += 1
    return found


def _events(log: Path, name: str) -> list[dict[str, Any]]:
    return log_events(log.read_text(errors="replace"), name)


def _no_phi(*texts: str) -> None:
    for text in texts:
        for value in SENTINEL_PHI.values():
            assert value not in text


def _http(config: Config, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{config.http.port}{path}", timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _separate_worker(tmp_path: Path, daemons: list[DaemonProcess], pacs: Pacs, bundle: Path,
                     receiver: str = "", **worker: object) -> tuple[DaemonProcess, Path]:
    """`serve` without its embedded worker: the test starts `opacityd worker` once every job is
    queued, so that they are claimed as one batch."""
    return start_daemon(tmp_path, daemons, _extra(pacs, receiver, embedded=False, **worker),
                        bundle=bundle)


def _score_as_one_batch(db: Db, cfg: Path, tmp_path: Path, workers: list[WorkerProcess],
                        studies: int) -> WorkerProcess:
    """Once ``studies`` jobs are queued, start `opacityd worker` (it claims them as one batch)
    and wait until every job is settled and every SR delivered; returns the worker."""
    wait_until(lambda: len(db.query(sa.select(Job).where(Job.state == JobState.QUEUED))) == studies,
               timeout=30, what=f"{studies} queued jobs")
    worker = WorkerProcess(cfg, tmp_path / "worker.log").start()
    workers.append(worker)
    wait_until(lambda: db.settled(studies), timeout=120, what="every job settled and SR delivered")
    return worker


PRIVATE_SOP_CLASS = "1.2.826.0.1.3680043.10.1234.1"
"""A vendor's private image storage class: accepted when configured, unknown to highdicom."""


def test_network_raising_on_one_image_fails_only_that_study_and_the_worker_goes_on(
        tmp_path: Path, daemons: list[DaemonProcess], workers: list[WorkerProcess], pacs: Pacs,
        faulty_bundle: Path, db_of: Any) -> None:
    daemon, cfg = _separate_worker(tmp_path, daemons, pacs, faulty_bundle)
    db = db_of(cfg)
    good = [make_dx(128, 128, seed=i) for i in range(3)]
    marked = _marked(seed=7)
    _store(daemon.port, tmp_path / "in", [good[0], marked, *good[1:]])
    worker = _score_as_one_batch(db, cfg, tmp_path, workers, 4)
    jobs = db.jobs()
    state, reason, error, _ = jobs[marked.StudyInstanceUID]
    assert (state, reason) == (JobState.FAILED, "inference_error")
    assert error is not None and "InvalidArgumentError" in error
    assert all(jobs[ds.StudyInstanceUID][:2] == (JobState.DONE, None) for ds in good)
    assert _srs_at(pacs) == {ds.StudyInstanceUID: 1 for ds in good}
    (batch_failure,) = _events(worker.log_path, "batch_inference_failed")
    assert batch_failure["images"] == 4  # one batch; the three others kept their scores
    (failed,) = _events(worker.log_path, "job_failed")
    assert failed["study_uid"] == marked.StudyInstanceUID and failed["reason"] == "inference_error"
    assert "Traceback" in failed["exception"] and "InvalidArgumentError" in failed["exception"]

    # The same worker process goes on scoring.
    late = make_dx(128, 128, seed=11)
    _store(daemon.port, tmp_path / "late", [late])
    wait_until(lambda: db.settled(5), timeout=60, what="the late study scored")
    assert db.jobs()[late.StudyInstanceUID][0] == JobState.DONE
    assert worker.alive()
    assert worker.terminate() == 0
    assert daemon.terminate() == 0


def test_sr_builder_raising_on_a_header_fails_only_that_study(
        tmp_path: Path, daemons: list[DaemonProcess], workers: list[WorkerProcess], pacs: Pacs,
        demo_bundle: Path, db_of: Any) -> None:
    daemon, cfg = _separate_worker(tmp_path, daemons, pacs, demo_bundle,
                                   receiver=f'extra_sop_classes = ["{PRIVATE_SOP_CLASS}"]')
    db = db_of(cfg)
    good = [make_dx(96, 96, seed=i) for i in range(2)]
    # highdicom cannot copy the patient and study modules of a class it does not know: KeyError.
    odd = make_dx(96, 96, seed=5, sop_class=PRIVATE_SOP_CLASS, phi=SENTINEL_PHI)
    _store(daemon.port, tmp_path / "in", good)
    # DCMTK's storescu proposes no context for a class it does not know: pynetdicom sends it.
    ae = AE(ae_title="VENDOR")
    ae.add_requested_context(PRIVATE_SOP_CLASS, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", daemon.port, ae_title="OPACITYD")
    assert assoc.is_established
    assert assoc.send_c_store(odd).Status == 0x0000
    assoc.release()
    worker = _score_as_one_batch(db, cfg, tmp_path, workers, 3)
    jobs = db.jobs()
    state, reason, error, attempts = jobs[odd.StudyInstanceUID]
    assert (state, reason, attempts) == (JobState.FAILED, "sr_build_failed", 1)  # permanent
    assert error is not None and "KeyError" in error
    assert all(jobs[ds.StudyInstanceUID][0] == JobState.DONE for ds in good)
    assert _srs_at(pacs) == {ds.StudyInstanceUID: 1 for ds in good}
    (failed,) = _events(worker.log_path, "job_failed")
    assert failed["job_id"] and failed["reason"] == "sr_build_failed"
    assert "build_sr" in failed["exception"]
    audit = db.query(sa.select(AuditEvent.detail).where(AuditEvent.action == AuditAction.JOB_FAILED))
    _no_phi(error, worker.log_path.read_text(), daemon.output(), *(d for (d,) in audit))
    assert worker.alive()
    assert worker.terminate() == 0


def test_spool_file_corrupted_after_acknowledgement_fails_only_its_study(
        tmp_path: Path, daemons: list[DaemonProcess], workers: list[WorkerProcess], pacs: Pacs,
        demo_bundle: Path, db_of: Any) -> None:
    daemon, cfg = _separate_worker(tmp_path, daemons, pacs, demo_bundle)
    db = db_of(cfg)
    studies = [make_dx(96, 96, seed=i) for i in range(3)]
    _store(daemon.port, tmp_path / "in", studies)
    victim = studies[1]
    (relative,) = db.query(sa.select(Instance.spool_path)
                           .where(Instance.sop_instance_uid == victim.SOPInstanceUID))[0]
    db.config.spool_dir.joinpath(relative).write_bytes(b"\x00" * 64 + b"not a DICOM file any more")
    worker = _score_as_one_batch(db, cfg, tmp_path, workers, 3)
    jobs = db.jobs()
    state, reason, error, _ = jobs[victim.StudyInstanceUID]
    assert (state, reason) == (JobState.FAILED, "spool_unreadable")
    assert error == f"spooled instances unreadable: {victim.SOPInstanceUID} (not_readable)"
    assert _srs_at(pacs) == {ds.StudyInstanceUID: 1 for ds in studies if ds is not victim}
    assert worker.alive()
    assert worker.terminate() == 0


def _fill(path: Path) -> None:
    """Write zeros at ``path`` until its file system is full."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    block = bytes(64 * 1024)
    try:
        while True:
            try:
                os.write(fd, block)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                if len(block) == 1:
                    return
                block = block[:len(block) // 2]
    finally:
        os.close(fd)


def test_full_disk_when_the_sr_is_written_retries_and_one_sr_arrives_once_space_returns(
        tmp_path: Path, daemons: list[DaemonProcess], pacs: Pacs, demo_bundle: Path,
        db_of: Any) -> None:
    with mounted_tmpfs(tmp_path / "d" / "state" / "spool", "2m") as spool:
        daemon, cfg = start_daemon(tmp_path, daemons, _extra(pacs, "min_free_disk_mb = 0",
                                                             max_attempts=50),
                                   quiet_s=2.0, bundle=demo_bundle)
        db = db_of(cfg)
        studies = [make_dx(96, 96, seed=i) for i in range(2)]
        _store(daemon.port, tmp_path / "in", studies)
        filler = spool / "filler.bin"
        _fill(filler)  # before the quiet period closes the studies: the SRs cannot be written

        def write_failed() -> bool:
            return any(reason == "sr_write_failed" and attempts >= 2
                       for _, reason, _, attempts in db.jobs().values())
        wait_until(write_failed, timeout=120, what="SR writes failing (and retried) on a full disk")
        assert db.query(sa.select(Result)) == []
        assert list(spool.rglob("*.partial")) == []  # a failed write leaves nothing behind
        state, _, error, _ = next(job for job in db.jobs().values() if job[1] == "sr_write_failed")
        assert state in (JobState.QUEUED, JobState.RUNNING)  # transient: retried, not failed
        assert error is not None and "ENOSPC" in error

        filler.unlink()
        wait_until(lambda: db.settled(2), timeout=120, what="SRs written once space returned")
        assert {uid: job[0] for uid, job in db.jobs().items()} == {
            ds.StudyInstanceUID: JobState.DONE for ds in studies}
        assert _srs_at(pacs) == {ds.StudyInstanceUID: 1 for ds in studies}
        assert "worker_process_exited" not in daemon.output()
        assert daemon.terminate() == 0


def _running_owner(db: Db, exclude: set[int]) -> int | None:
    """The pid of a worker holding a RUNNING job, other than those in ``exclude``."""
    for (owner,) in db.query(sa.select(Job.lease_owner).where(Job.state == JobState.RUNNING)):
        pid = int(owner.split(":")[1])
        if pid not in exclude:
            return pid
    return None


def test_worker_killed_while_writing_srs_is_restarted_and_every_study_gets_one_sr(
        tmp_path: Path, daemons: list[DaemonProcess], pacs: Pacs, demo_bundle: Path,
        db_of: Any) -> None:
    # A lease far longer than the test: the jobs come back because serve releases them.
    daemon, cfg = start_daemon(tmp_path, daemons, _extra(pacs, lease_s=600.0), bundle=demo_bundle)
    db = db_of(cfg)
    studies = [make_dx(512, 512, seed=i) for i in range(6)]
    _store(daemon.port, tmp_path / "in", studies)
    pid = wait_until(lambda: _running_owner(db, set()), timeout=60, interval=0.01,
                     what="the worker to claim the jobs")
    sr_folder = db.config.spool_dir / "sr"
    wait_until(lambda: sr_folder.is_dir() and any(p.is_file() for p in sr_folder.rglob("*")),
               timeout=60, interval=0.002, what="the first SR file being written")
    os.kill(pid, signal.SIGKILL)

    wait_until(lambda: db.settled(6), timeout=120, what="every study scored after the restart")
    assert {uid: job[0] for uid, job in db.jobs().items()} == {
        ds.StudyInstanceUID: JobState.DONE for ds in studies}
    assert _srs_at(pacs) == {ds.StudyInstanceUID: 1 for ds in studies}
    assert len(db.query(sa.select(Result))) == 6
    log = tmp_path / "daemon.log"
    (exited,) = _events(log, "worker_process_exited")
    assert (exited["pid"], exited["status"]) == (pid, "SIGKILL")
    (released,) = _events(log, "worker_leases_released")
    assert released["pid"] == pid and released["jobs"]
    assert len(_events(log, "worker_process_started")) == 2
    retried = db.query(sa.select(AuditEvent.detail).where(AuditEvent.action == AuditAction.JOB_RETRY,
                                                          AuditEvent.actor == "serve"))
    assert retried and all('"reason": "abandoned"' in detail for (detail,) in retried)
    status, body = _http(db.config, "/metrics")
    assert status == 200 and b"opacityd_worker_restarts_total 1.0" in body
    assert daemon.terminate() == 0


def test_job_whose_worker_vanishes_max_attempts_times_ends_failed_abandoned(
        tmp_path: Path, daemons: list[DaemonProcess], pacs: Pacs, demo_bundle: Path,
        db_of: Any) -> None:
    daemon, cfg = start_daemon(tmp_path, daemons, _extra(pacs, lease_s=600.0, max_attempts=3),
                               bundle=demo_bundle)
    db = db_of(cfg)
    study = make_dx(2048, 2048, seed=3)
    _store(daemon.port, tmp_path / "in", [study])
    killed: set[int] = set()
    for attempt in range(1, 4):
        pid = wait_until(lambda: _running_owner(db, killed), timeout=90, interval=0.005,
                         what=f"claim number {attempt}")
        os.kill(pid, signal.SIGSTOP)  # hold it mid-job, make sure it still owns the job, kill it
        assert db.jobs()[study.StudyInstanceUID][0] == JobState.RUNNING
        os.kill(pid, signal.SIGKILL)
        killed.add(pid)

    wait_until(lambda: db.jobs()[study.StudyInstanceUID][0] == JobState.FAILED, timeout=30,
               what="the job to end failed")
    state, reason, error, attempts = db.jobs()[study.StudyInstanceUID]
    assert (state, reason, attempts) == (JobState.FAILED, "abandoned", 3)
    assert error is not None and "vanished" in error
    log = tmp_path / "daemon.log"
    (alert,) = _events(log, "job_abandoned")
    assert alert["level"] == "critical" and alert["study_uid"] == study.StudyInstanceUID
    assert [e["status"] for e in _events(log, "worker_process_exited")] == ["SIGKILL"] * 3
    waits = [e["restart_in_s"] for e in _events(log, "worker_restart_scheduled")]
    assert len(waits) == 3 and waits[2] > waits[0]  # the backoff grows while it keeps dying
    status, body = _http(db.config, "/readyz")
    ready = json.loads(body)
    assert status == 503 and "worker" in ready["failed"]
    status, body = _http(db.config, "/metrics")
    assert b"opacityd_worker_quick_deaths 3.0" in body
    # The job is never claimed again; the restarted worker stays idle.
    assert db.query(sa.select(Result)) == []
    assert daemon.terminate() == 0


def test_separate_worker_reclaiming_an_expired_lease_on_the_last_attempt_abandons_the_job(
        tmp_path: Path, daemons: list[DaemonProcess], workers: list[WorkerProcess], pacs: Pacs,
        demo_bundle: Path, db_of: Any) -> None:
    """No serve saw these workers die: the next worker finds the expired lease."""
    daemon, cfg = _separate_worker(tmp_path, daemons, pacs, demo_bundle, lease_s=1.0,
                                   max_attempts=2)
    db = db_of(cfg)
    study = make_dx(2048, 2048, seed=4)
    _store(daemon.port, tmp_path / "in", [study])
    killed: set[int] = set()
    for attempt in range(1, 3):
        worker = WorkerProcess(cfg, tmp_path / f"worker{attempt}.log").start()
        workers.append(worker)
        pid = wait_until(lambda: _running_owner(db, killed), timeout=90, interval=0.005,
                         what=f"claim number {attempt}")
        assert worker.proc is not None and pid == worker.proc.pid
        os.kill(pid, signal.SIGSTOP)
        assert db.jobs()[study.StudyInstanceUID][0] == JobState.RUNNING
        os.kill(pid, signal.SIGKILL)
        killed.add(pid)
    last = WorkerProcess(cfg, tmp_path / "worker3.log").start()
    workers.append(last)
    wait_until(lambda: db.jobs()[study.StudyInstanceUID][0] == JobState.FAILED, timeout=90,
               what="the job to end failed")
    state, reason, _, attempts = db.jobs()[study.StudyInstanceUID]
    assert (state, reason, attempts) == (JobState.FAILED, "abandoned", 2)
    (alert,) = _events(last.log_path, "job_abandoned")
    assert alert["level"] == "critical"
    assert last.alive() and last.terminate() == 0
    assert daemon.terminate() == 0


def test_a_batch_slower_than_the_lease_keeps_its_jobs_from_a_second_worker(
        tmp_path: Path, daemons: list[DaemonProcess], workers: list[WorkerProcess], pacs: Pacs,
        demo_bundle: Path, db_of: Any) -> None:
    lease_s = 1.0
    daemon, cfg = _separate_worker(tmp_path, daemons, pacs, demo_bundle, lease_s=lease_s,
                                   batch_size=8, threads=1)
    db = db_of(cfg)
    two = [WorkerProcess(cfg, tmp_path / f"worker{i}.log").start() for i in range(2)]
    workers.extend(two)
    run_dir = db.config.state_dir / "run"
    wait_until(lambda: len(list(run_dir.glob("worker-*.ready"))) == 2, timeout=90,
               what="both workers to load the model")
    studies = [make_dx(2048, 2048, seed=i) for i in range(8)]
    _store(daemon.port, tmp_path / "in", studies)

    wait_until(lambda: db.settled(8), timeout=180, what="every study scored")
    claims = db.query(sa.select(AuditEvent.study_uid, AuditEvent.at)
                      .where(AuditEvent.action == AuditAction.JOB_CLAIMED))
    assert sorted(uid for uid, _ in claims) == sorted(ds.StudyInstanceUID for ds in studies)
    done = dict(db.query(sa.select(AuditEvent.study_uid, AuditEvent.at)
                         .where(AuditEvent.action == AuditAction.JOB_DONE)))
    held = max((done[uid] - at).total_seconds() for uid, at in claims)
    # The batch outlived its lease while every study was claimed exactly once (above) and no
    # worker lost a lease (below): its lease was renewed, not taken over by the idle worker.
    assert held > lease_s, held
    assert _srs_at(pacs) == {ds.StudyInstanceUID: 1 for ds in studies}
    for w in two:
        assert _events(w.log_path, "lease_lost") == [] and _events(w.log_path, "job_lost_lease") == []


def test_a_worker_that_stayed_up_is_restarted_after_the_shortest_wait(
        tmp_path: Path, daemons: list[DaemonProcess], pacs: Pacs, demo_bundle: Path) -> None:
    # restart_max_s is also how long a worker must stay up to count as healthy again; loading
    # the model alone takes longer than this, so no death here is a quick one after the first.
    daemon, cfg = start_daemon(tmp_path, daemons, _extra(pacs, restart_base_s=0.3,
                                                         restart_max_s=0.6),
                               bundle=demo_bundle)
    config = load_config(cfg, env={})
    run_dir = config.state_dir / "run"
    log = tmp_path / "daemon.log"
    for death in range(1, 3):
        marker = wait_until(lambda: next(iter(run_dir.glob("worker-*.ready")), None), timeout=90,
                            what=f"worker number {death} to load the model")
        wait_until(lambda n=death: len(_events(log, "worker_process_stable")) >= n - 1, timeout=30,
                   what="the supervisor to see the restarted worker stay up")
        os.kill(int(marker.name.split("-")[1].split(".")[0]), signal.SIGKILL)
        wait_until(lambda n=death: len(_events(log, "worker_restart_scheduled")) == n, timeout=30,
                   what=f"restart number {death} scheduled")
    scheduled = _events(log, "worker_restart_scheduled")
    assert [e["quick_deaths"] for e in scheduled] == [1, 1]
    assert all(e["restart_in_s"] <= 0.3 * 1.5 for e in scheduled)  # the base wait, jittered
    status, body = _http(config, "/readyz")
    assert "worker" not in json.loads(body)["failed"]
    assert daemon.terminate() == 0


def test_a_logged_traceback_names_frames_and_types_but_never_the_message() -> None:
    from daemon.worker import traceback_text

    def build() -> None:
        raise TypeError(f"Invalid value {SENTINEL_PHI['PatientName']!r}")
    try:
        try:
            build()
        except TypeError as e:
            raise RuntimeError(SENTINEL_PHI["PatientID"]) from e
    except RuntimeError as e:
        text = traceback_text(e)
    assert "in build" in text and "builtins.TypeError" in text and "builtins.RuntimeError" in text
    assert text.index("builtins.TypeError") < text.index("builtins.RuntimeError")  # cause first
    _no_phi(text)


class WriteLock:
    """Another process that takes SQLite's write lock (``BEGIN EXCLUSIVE``) on demand, started
    beforehand so that taking the lock is quick."""

    SCRIPT = ("import sqlite3, sys\n"
              "conn = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
              "sys.stdin.readline()\n"
              "conn.execute('BEGIN EXCLUSIVE')\n"
              "print('locked', flush=True)\n"
              "sys.stdin.readline()\n"
              "conn.execute('ROLLBACK')\n")

    def __init__(self, database: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", self.SCRIPT, str(database)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def take(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("take\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "locked"

    def release(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("release\n")
        self.proc.stdin.close()
        assert self.proc.wait(timeout=30) == 0


def test_database_locked_while_results_are_recorded_retries_and_one_sr_arrives(
        tmp_path: Path, daemons: list[DaemonProcess], workers: list[WorkerProcess], pacs: Pacs,
        demo_bundle: Path, db_of: Any) -> None:
    daemon, cfg = start_daemon(tmp_path, daemons,
                               _extra(pacs, embedded=False, lease_s=2.0) +
                               "[database]\nbusy_timeout_ms = 300\n", bundle=demo_bundle)
    db = db_of(cfg)
    studies = [make_dx(1024, 1024, seed=i) for i in range(3)]
    _store(daemon.port, tmp_path / "in", studies)
    wait_until(lambda: len(db.query(sa.select(Job).where(Job.state == JobState.QUEUED))) == 3,
               timeout=30, what="three queued jobs")
    lock = WriteLock(Path(db.config.database_url.removeprefix("sqlite:///")))
    worker = WorkerProcess(cfg, tmp_path / "worker.log").start()
    workers.append(worker)
    wait_until(lambda: _running_owner(db, set()), timeout=90, interval=0.005,
               what="the worker to claim the batch")
    lock.take()  # the batch is being scored: its results cannot be recorded, nor its failures
    try:
        unrecorded = wait_until(lambda: _events(worker.log_path, "job_failure_not_recorded"),
                                timeout=60, what="a failure that could not be recorded")
    finally:
        lock.release()
    assert unrecorded[0]["reason"] == "database_busy"
    assert "OperationalError" in unrecorded[0]["error"]

    # The unrecorded job keeps its lease until it expires; then it is claimed again.
    wait_until(lambda: db.settled(3), timeout=120, what="every study scored after the lock")
    jobs = db.jobs()
    assert {uid: job[0] for uid, job in jobs.items()} == {
        ds.StudyInstanceUID: JobState.DONE for ds in studies}
    assert max(job[3] for job in jobs.values()) == 2
    assert _srs_at(pacs) == {ds.StudyInstanceUID: 1 for ds in studies}
    assert worker.alive() and worker.terminate() == 0


def test_a_restarted_worker_releases_the_leases_its_dead_predecessor_held_at_once(
        tmp_path: Path, daemons: list[DaemonProcess], workers: list[WorkerProcess], pacs: Pacs,
        demo_bundle: Path, db_of: Any) -> None:
    """What a kill -9 of a standalone worker leaves (a RUNNING job under a long lease, owned by
    a pid that is gone) is taken back by the next worker on the host when it starts, not after
    the lease."""
    daemon, cfg = _separate_worker(tmp_path, daemons, pacs, demo_bundle, lease_s=600.0)
    db = db_of(cfg)
    study = make_dx(96, 96, seed=21)
    _store(daemon.port, tmp_path / "in", [study])
    wait_until(lambda: len(db.query(sa.select(Job).where(Job.state == JobState.QUEUED))) == 1,
               timeout=30, what="a queued job")
    gone = subprocess.Popen(["true"])
    gone.wait()
    with unit_of_work(db.sessions) as session:
        job = session.scalars(sa.select(Job)).one()
        job.state, job.attempts = JobState.RUNNING, 1
        job.lease_owner = f"{socket.gethostname()}:{gone.pid}:1"
        job.lease_expires_at = datetime.now(UTC) + timedelta(seconds=600)
    worker = WorkerProcess(cfg, tmp_path / "worker.log").start()
    workers.append(worker)
    wait_until(lambda: db.settled(1), timeout=120, what="the job scored and delivered")
    ((state, _, _, attempts),) = db.jobs().values()
    assert state == JobState.DONE and attempts == 2  # the vanished attempt stays counted
    (released,) = _events(worker.log_path, "dead_worker_leases_released")
    assert released["pid"] == gone.pid
    assert _srs_at(pacs) == {study.StudyInstanceUID: 1}
    assert worker.terminate() == 0


def test_a_spool_file_deleted_after_acknowledgement_fails_its_study_as_missing(
        tmp_path: Path, daemons: list[DaemonProcess], workers: list[WorkerProcess], pacs: Pacs,
        demo_bundle: Path, db_of: Any) -> None:
    daemon, cfg = _separate_worker(tmp_path, daemons, pacs, demo_bundle)
    db = db_of(cfg)
    studies = [make_dx(96, 96, seed=20 + i) for i in range(2)]
    _store(daemon.port, tmp_path / "in", studies)
    victim = studies[0]
    (relative,) = db.query(sa.select(Instance.spool_path)
                           .where(Instance.sop_instance_uid == victim.SOPInstanceUID))[0]
    db.config.spool_dir.joinpath(relative).unlink()
    worker = _score_as_one_batch(db, cfg, tmp_path, workers, 2)
    state, reason, error, _ = db.jobs()[victim.StudyInstanceUID]
    assert (state, reason) == (JobState.FAILED, "spool_file_missing")
    assert error == f"spooled instances missing: {victim.SOPInstanceUID}"
    assert _srs_at(pacs) == {studies[1].StudyInstanceUID: 1}
    assert worker.terminate() == 0


def test_a_worker_whose_spool_is_not_mounted_claims_nothing_and_scores_once_it_is(
        tmp_path: Path, daemons: list[DaemonProcess], workers: list[WorkerProcess], pacs: Pacs,
        demo_bundle: Path, db_of: Any) -> None:
    """A worker host without the shared mount sees an empty folder at the spool's path (here a
    tmpfs mounted over it): it claims nothing, says why, and scores everything once the real
    spool is back."""
    daemon, cfg = _separate_worker(tmp_path, daemons, pacs, demo_bundle)
    db = db_of(cfg)
    studies = [make_dx(96, 96, seed=30 + i) for i in range(2)]
    _store(daemon.port, tmp_path / "in", studies)
    wait_until(lambda: len(db.query(sa.select(Job).where(Job.state == JobState.QUEUED))) == 2,
               timeout=30, what="2 queued jobs")
    with mounted_tmpfs(db.config.spool_dir, "1m"):
        worker = WorkerProcess(cfg, tmp_path / "worker.log").start()
        workers.append(worker)
        waiting = wait_until(lambda: _events(worker.log_path, "worker_waiting"), timeout=60,
                             what="the worker to say it waits for the spool")
        assert waiting[0]["reason"] == "spool_not_mounted"
        jobs = db.query(sa.select(Job.state, Job.attempts))
        assert jobs == [(JobState.QUEUED, 0)] * 2  # nothing claimed, no attempt spent
    wait_until(lambda: db.settled(2), timeout=120, what="every job scored once the spool is back")
    assert {state for state, *_ in db.jobs().values()} == {JobState.DONE}
    (resumed,) = _events(worker.log_path, "worker_resumed")
    assert resumed["waited_for"] == "spool_not_mounted"
    assert worker.terminate() == 0

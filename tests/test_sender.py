"""The sender against a pynetdicom Storage SCP run by the test: each kind of answer (a status
class, a transient or permanent association rejection, no SR context, nobody listening, no
answer in time) ends retried or failed at once, on a real SQLite database with real SR files."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import structlog
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import ComprehensiveSRStorage, Verification
from structlog.testing import capture_logs

from daemon.config import load_config
from daemon.dicom.sender import DeliveryReason, classify_status, send_due
from daemon.results.report import ImageOutcome, build_sr
from db import deliveries, jobs, queue
from db.engine import unit_of_work
from db.models import Delivery
from db.states import DeliveryState
from model.manifest import Manifest, Thresholds
from model.preprocess import PreprocessSpec
from tests.conftest import free_port, wait_until, write_config
from tests.delivery_env import Env
from tests.factories import make_dx

MANIFEST = Manifest(name="opacity-test", version="1.0.0", created="2026-01-01T00:00:00Z",
                    keras_version="3", backend="tensorflow", preprocessing=PreprocessSpec(),
                    class_names=("none", "opacity"), positive_class="opacity",
                    thresholds=Thresholds(), weights_sha256="ab" * 32)
COMMENT = "SENTINEL comment from the PACS"


@dataclass
class Scp:
    """A pynetdicom Storage SCP on loopback that answers what the test chooses."""

    port: int
    status: int = 0x0000
    comment: str = ""
    accept_sr: bool = True
    require_called_ae: bool = False
    max_associations: int = 10
    hold: threading.Event | None = None
    """Set: each C-STORE waits for this event before it answers (a PACS that hangs)."""
    received: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        ae = AE(ae_title="PACS")
        ae.add_supported_context(Verification)
        if self.accept_sr:
            ae.add_supported_context(ComprehensiveSRStorage,
                                     [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        ae.require_called_aet = self.require_called_ae
        ae.maximum_associations = self.max_associations
        self.ae = ae
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event: evt.Event) -> Dataset:
        if self.hold is not None:
            self.hold.wait(30)
        self.received.append(str(event.dataset.SOPInstanceUID))
        answer = Dataset()
        answer.Status = self.status
        if self.comment:
            answer.ErrorComment = self.comment
        return answer

    def stop(self) -> None:
        if self.hold is not None:
            self.hold.set()
        self.server.shutdown()


def _env(tmp_path: Path, port: int, *, called_ae: str = "PACS", max_attempts: int = 3,
         extra: str = "", database_url: str = "") -> Env:
    config = load_config(write_config(tmp_path, database_url=database_url, extra=(
        f'[delivery]\ntimeout_s = 1.0\nmax_attempts = {max_attempts}\n'
        'retry_base_s = 5.0\nretry_max_s = 60.0\n'
        f'[[destinations]]\nname = "pacs"\nhost = "127.0.0.1"\nport = {port}\n'
        f'called_ae = "{called_ae}"\ncalling_ae = "OPACITYD"\n{extra}')), env={})
    return Env.open(config)


def _results(env: Env, count: int, destinations: tuple[str, ...] = ("pacs",)) -> list[Path]:
    """``count`` scored studies recorded the way the worker does it (instance row, quiet study,
    claimed job, SR file, finish_job): one pending delivery per destination each. Returns the
    SR files."""
    now = datetime.now(UTC)
    images = {}
    with unit_of_work(env.sessions) as s:
        for i in range(count):
            image = make_dx(seed=i)
            images[str(image.StudyInstanceUID)] = image
            queue.record_instance(s, queue.InstanceRecord(
                study_uid=image.StudyInstanceUID, series_uid=image.SeriesInstanceUID,
                sop_instance_uid=image.SOPInstanceUID, sop_class_uid=image.SOPClassUID,
                transfer_syntax_uid=ExplicitVRLittleEndian, modality="DX", body_part="CHEST",
                view_position="PA", accession_number=None, eligible=True,
                eligibility_reason="eligible", spool_path=f"in/{image.SOPInstanceUID}.dcm",
                size_bytes=1, calling_ae="MODALITY", content_hash=f"{i:064x}"), now)
        queue.complete_quiet_studies(s, timedelta(0), now)
    with unit_of_work(env.sessions) as s:
        claimed = jobs.claim_jobs(s, "test", timedelta(minutes=5), now, count)
    paths = []
    for i, job in enumerate(claimed):
        image = images[job.study_uid]
        sr = build_sr(job.study_uid, [ImageOutcome(image, 0.3, None, f"{i:064x}")], MANIFEST,
                      revision=job.revision)
        relative = f"sr/{job.study_uid}/{sr.SOPInstanceUID}.dcm"
        path = env.spool.absolute(relative)
        path.parent.mkdir(parents=True, exist_ok=True)
        sr.save_as(path, enforce_file_format=True)
        paths.append(path)
        record = jobs.ResultRecord(
            model_name=MANIFEST.name, model_version=MANIFEST.version, model_validated=False,
            probability=0.3, decision=False, threshold=0.5, urgent_threshold=0.9,
            elevated_threshold=0.5, priority="routine", inference_seconds=0.0,
            sr_sop_instance_uid=str(sr.SOPInstanceUID), sr_series_uid=str(sr.SeriesInstanceUID),
            sr_path=relative, detail={})
        with unit_of_work(env.sessions) as s:
            assert jobs.finish_job(s, job, "test", record, list(destinations), now) is True
    return paths


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def scps() -> Iterator[list[Scp]]:
    started: list[Scp] = []
    yield started
    for scp in started:
        scp.stop()


def _send(env: Env) -> tuple[int, list[MutableMapping[str, Any]]]:
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        sent = send_due(env.config, env.sessions, env.spool)
    return sent, logs


def _assert_retried(env: Env, reason: DeliveryReason, before: datetime, attempts: int = 1) -> Delivery:
    (d,) = env.deliveries()
    assert (d.state, d.attempts, d.last_reason) == (DeliveryState.PENDING, attempts, reason.value), \
        (d.state, d.attempts, d.last_reason, d.last_detail)
    # retry_base_s 5 with jitter 0.5: the next attempt is 2.5 to 7.5 s after the first.
    assert before + timedelta(seconds=2.4) < d.next_attempt_at < datetime.now(UTC) + timedelta(seconds=7.6)
    return d


def _assert_failed_at_once(env: Env, reason: DeliveryReason,
                           logs: list[MutableMapping[str, Any]]) -> Delivery:
    (d,) = env.deliveries()
    assert (d.state, d.attempts, d.last_reason) == (DeliveryState.FAILED, 1, reason.value), \
        (d.state, d.attempts, d.last_reason, d.last_detail)
    (alert,) = [e for e in logs if e["event"] == "delivery_failed_alert"]
    assert alert["log_level"] == "critical"
    assert (alert["reason"], alert["final"], alert["study_uid"]) == (reason.value, "permanent",
                                                                      _study_of(env))
    return d


def _study_of(env: Env) -> str:
    with unit_of_work(env.sessions) as s:
        return str(s.scalar(sa.text("SELECT study_uid FROM studies")))


@pytest.mark.parametrize(("status", "reason"), [
    (0xA700, DeliveryReason.OUT_OF_RESOURCES),
    (0xA7FF, DeliveryReason.OUT_OF_RESOURCES),
])
def test_out_of_resources_is_retried_with_the_policy(tmp_path: Path, port: int, scps: list[Scp],
                                                     status: int, reason: DeliveryReason) -> None:
    scps.append(Scp(port, status=status, comment=COMMENT))
    env = _env(tmp_path, port)
    _results(env, 1)
    before = datetime.now(UTC)
    sent, logs = _send(env)
    assert sent == 0
    d = _assert_retried(env, reason, before)
    assert d.last_detail == f"status 0x{status:04X} {COMMENT}"
    (retry,) = [e for e in logs if e["event"] == "delivery_retry"]
    assert retry["detail"] == f"status 0x{status:04X}"  # the PACS's free text stays out of logs
    assert not any(COMMENT in str(e) for e in logs)


@pytest.mark.parametrize(("status", "reason"), [
    (0xA900, DeliveryReason.DATASET_MISMATCH),
    (0xC000, DeliveryReason.CANNOT_UNDERSTAND),
    (0xC2FF, DeliveryReason.CANNOT_UNDERSTAND),
    (0x0122, DeliveryReason.SOP_CLASS_NOT_SUPPORTED),
    (0x0110, DeliveryReason.FAILURE_STATUS),
    (0xA800, DeliveryReason.FAILURE_STATUS),
])
def test_a_permanent_status_fails_the_delivery_at_once_with_an_alert(
        tmp_path: Path, port: int, scps: list[Scp], status: int, reason: DeliveryReason) -> None:
    scp = Scp(port, status=status, comment=COMMENT)
    scps.append(scp)
    env = _env(tmp_path, port)
    _results(env, 1)
    sent, logs = _send(env)
    assert sent == 0 and len(scp.received) == 1
    d = _assert_failed_at_once(env, reason, logs)
    assert d.last_detail == f"status 0x{status:04X} {COMMENT}"
    assert not any(COMMENT in str(e) for e in logs)


@pytest.mark.parametrize("status", [0x0000, 0xB000, 0xB007])
def test_success_and_warning_statuses_deliver(tmp_path: Path, port: int, scps: list[Scp],
                                              status: int) -> None:
    scp = Scp(port, status=status)
    scps.append(scp)
    env = _env(tmp_path, port)
    (path,) = _results(env, 1)
    sent, _ = _send(env)
    (d,) = env.deliveries()
    assert (sent, d.state, d.attempts, d.last_detail) == (1, DeliveryState.DELIVERED, 1,
                                                          f"status 0x{status:04X}")
    assert scp.received == [path.stem]


def test_a_transient_association_rejection_is_retried(tmp_path: Path, port: int,
                                                      scps: list[Scp]) -> None:
    scp = Scp(port, max_associations=1)
    scps.append(scp)
    env = _env(tmp_path, port)
    _results(env, 1)
    # Another client holds the PACS's only association: it rejects ours as "transient".
    other = AE(ae_title="OTHER")
    other.add_requested_context(Verification)
    held = other.associate("127.0.0.1", port, ae_title="PACS")
    assert held.is_established
    try:
        before = datetime.now(UTC)
        sent, _ = _send(env)
    finally:
        held.release()
    d = _assert_retried(env, DeliveryReason.ASSOCIATION_REJECTED_TRANSIENT, before)
    assert "Rejected Transient" in (d.last_detail or "") and scp.received == []
    # Once the other client is gone the next attempt gets through.
    wait_until(lambda: not scp.ae.active_associations, what="the held association to end")
    env.make_due()
    assert _send(env)[0] == 1
    assert env.deliveries()[0].attempts == 2


def test_a_permanent_association_rejection_fails_at_once(tmp_path: Path, port: int,
                                                         scps: list[Scp]) -> None:
    scps.append(Scp(port, require_called_ae=True))
    env = _env(tmp_path, port, called_ae="NOTPACS")
    _results(env, 1)
    _, logs = _send(env)
    d = _assert_failed_at_once(env, DeliveryReason.ASSOCIATION_REJECTED, logs)
    assert "Rejected Permanent" in (d.last_detail or "") and "NOTPACS" in (d.last_detail or "")


def test_a_pacs_without_an_sr_context_fails_at_once(tmp_path: Path, port: int,
                                                    scps: list[Scp]) -> None:
    scps.append(Scp(port, accept_sr=False))
    env = _env(tmp_path, port)
    _results(env, 1)
    _, logs = _send(env)
    d = _assert_failed_at_once(env, DeliveryReason.NO_PRESENTATION_CONTEXT, logs)
    assert "no Comprehensive SR presentation context" in (d.last_detail or "")


def test_a_pacs_that_is_down_is_retried_until_the_attempts_are_spent(tmp_path: Path,
                                                                     port: int) -> None:
    env = _env(tmp_path, port, max_attempts=2)
    _results(env, 1)
    before = datetime.now(UTC)
    _send(env)
    d = _assert_retried(env, DeliveryReason.UNREACHABLE, before)
    assert "refused the connection" in (d.last_detail or "")
    env.make_due()
    _, logs = _send(env)
    (d,) = env.deliveries()
    assert (d.state, d.attempts, d.last_reason) == (DeliveryState.FAILED, 2, "unreachable")
    (alert,) = [e for e in logs if e["event"] == "delivery_failed_alert"]
    assert (alert["log_level"], alert["final"]) == ("critical", "attempts_exhausted")


def test_a_pacs_that_never_answers_the_association_is_retried(tmp_path: Path) -> None:
    with socket.socket() as silent:  # accepts TCP (backlog) but never speaks DICOM
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        env = _env(tmp_path, silent.getsockname()[1])
        _results(env, 1)
        before = datetime.now(UTC)
        _send(env)
    d = _assert_retried(env, DeliveryReason.UNREACHABLE, before)
    assert "gave no association answer within 1 s" in (d.last_detail or "")


def test_a_pacs_that_hangs_during_the_store_is_retried(tmp_path: Path, port: int,
                                                       scps: list[Scp]) -> None:
    hold = threading.Event()
    scp = Scp(port, hold=hold)
    scps.append(scp)
    env = _env(tmp_path, port)
    _results(env, 1)
    before = datetime.now(UTC)
    _send(env)
    hold.set()
    d = _assert_retried(env, DeliveryReason.CONNECTION_LOST, before)
    assert "no C-STORE response within 1 s" in (d.last_detail or "")


def test_an_unreadable_sr_fails_only_its_own_delivery(tmp_path: Path, port: int,
                                                      scps: list[Scp]) -> None:
    scp = Scp(port)
    scps.append(scp)
    env = _env(tmp_path, port)
    missing, garbage, truncated, other_object, good = _results(env, 5)
    missing.unlink()
    garbage.write_bytes(b"not a DICOM file at all" * 10)
    truncated.write_bytes(truncated.read_bytes()[:300])
    other_object.write_bytes(good.read_bytes())  # a readable SR, but not the one its row names
    sent, logs = _send(env)
    assert sent == 1 and scp.received == [good.stem]
    by_path = {Path(d_path).name: d for d_path, d in _rows_by_sr_path(env)}
    assert by_path[good.name].state == DeliveryState.DELIVERED
    for path in (missing, garbage, truncated, other_object):
        d = by_path[path.name]
        assert (d.state, d.attempts, d.last_reason) == (DeliveryState.FAILED, 1, "sr_unreadable"), \
            (path.name, d.last_detail)
        assert path.name in (d.last_detail or "")
    assert "holds another object" in (by_path[other_object.name].last_detail or "")
    alerts = [e for e in logs if e["event"] == "delivery_failed_alert"]
    assert len(alerts) == 4 and {a["reason"] for a in alerts} == {"sr_unreadable"}


def _rows_by_sr_path(env: Env) -> list[tuple[str, Delivery]]:
    with unit_of_work(env.sessions) as s:
        rows = s.execute(sa.text("SELECT r.sr_path, d.id FROM deliveries d "
                                 "JOIN results r ON r.id = d.result_id")).all()
        by_id = {d.id: d for d in s.scalars(sa.select(Delivery))}
    return [(path, by_id[delivery_id]) for path, delivery_id in rows]


def test_an_exception_in_one_delivery_is_recorded_on_it_and_the_others_go_on(
        tmp_path: Path, port: int, scps: list[Scp]) -> None:
    scp = Scp(port)
    scps.append(scp)
    # A second destination whose client certificate file does not exist: building its TLS
    # context raises inside the attempt.
    broken = (f'[[destinations]]\nname = "broken"\nhost = "127.0.0.1"\nport = {port}\n'
              'called_ae = "PACS"\n[destinations.tls]\nenabled = true\n'
              f'certificate = "{tmp_path / "absent.crt"}"\n'
              f'private_key = "{tmp_path / "absent.key"}"\n')
    env = _env(tmp_path, port, extra=broken)
    (path,) = _results(env, 1, destinations=("broken", "pacs"))
    sent, logs = _send(env)
    assert sent == 1 and scp.received == [path.stem]
    states = {d.destination: d for d in env.deliveries()}
    assert states["pacs"].state == DeliveryState.DELIVERED
    crashed = states["broken"]
    assert (crashed.state, crashed.attempts, crashed.last_reason) == (
        DeliveryState.PENDING, 1, "internal_error")
    assert "FileNotFoundError" in (crashed.last_detail or "")
    (event,) = [e for e in logs if e["event"] == "delivery_attempt_crashed"]
    assert event["destination"] == "broken" and "Traceback" not in event["exception"]
    assert "_tls" in event["exception"]


def test_a_down_destination_is_tried_once_per_pass(tmp_path: Path, port: int) -> None:
    env = _env(tmp_path, port)
    _results(env, 3)
    _, logs = _send(env)
    rows = env.deliveries()
    assert sorted(d.attempts for d in rows) == [0, 0, 1]
    assert len([e for e in logs if e["event"] == "delivery_deferred"]) == 2


def test_status_classes() -> None:
    for code in (0x0000, 0x0001, 0x0107, 0x0116, 0xB000, 0xB006):
        assert classify_status(code).delivered, hex(code)
    assert classify_status(0xA701).transient
    for code in (0x0122, 0xA900, 0xA9FF, 0xC000, 0xCFFF, 0x0110, 0x0211, 0xFE00):
        outcome = classify_status(code, "x")
        assert not outcome.delivered and not outcome.transient, hex(code)
        assert outcome.detail == f"status 0x{code:04X} x"


def test_two_claims_at_the_same_time_never_return_the_same_delivery(
        tmp_path: Path, port: int, database_url: str) -> None:
    env = _env(tmp_path, port, database_url=database_url)
    _results(env, 3)
    now = datetime.now(UTC)
    with unit_of_work(env.sessions) as s:
        first = deliveries.due(s, now, limit=2)
    with unit_of_work(env.sessions) as s:
        second = deliveries.due(s, now, limit=2)
    with unit_of_work(env.sessions) as s:
        third = deliveries.due(s, now, limit=2)
    assert len(first) == 2 and len(second) == 1 and third == []
    assert not {d.delivery_id for d in first} & {d.delivery_id for d in second}


def test_a_claim_of_a_crashed_sender_lapses_and_the_delivery_is_due_again(tmp_path: Path,
                                                                          port: int) -> None:
    env = _env(tmp_path, port)
    _results(env, 1)
    now = datetime.now(UTC)
    lease = timedelta(minutes=2)
    with unit_of_work(env.sessions) as s:
        (crashed,) = deliveries.due(s, now, lease=lease)  # claimed, then the sender died
    with unit_of_work(env.sessions) as s:
        assert deliveries.due(s, now + lease - timedelta(seconds=1)) == []
    with unit_of_work(env.sessions) as s:
        (again,) = deliveries.due(s, now + lease, lease=lease)
    assert again.delivery_id == crashed.delivery_id
    # The first claim is gone: the old holder may not start an attempt on it any more.
    with unit_of_work(env.sessions) as s:
        assert deliveries.start_attempt(s, crashed, now + lease, lease) is None
        assert deliveries.start_attempt(s, again, now + lease, lease) is not None


def test_deliveries_deferred_behind_a_down_destination_are_due_at_the_next_pass(
        tmp_path: Path, port: int) -> None:
    env = _env(tmp_path, port)
    _results(env, 3)
    _send(env)
    with unit_of_work(env.sessions) as s:
        due_now = deliveries.due(s, datetime.now(UTC))
    # the one attempted waits for its retry; the two deferred were given back at once
    assert len(due_now) == 2 and all(d.attempts == 0 for d in due_now)


def test_a_claim_in_progress_is_skipped_by_a_concurrent_claim_on_postgresql(
        tmp_path: Path, port: int, pg_cluster: Any) -> None:
    """Two senders polling at once: the second skips the rows the first holds locked (FOR
    UPDATE SKIP LOCKED) before it commits, and after it commits they are no longer due."""
    env = _env(tmp_path, port, database_url=pg_cluster.new_database())
    _results(env, 3)
    now = datetime.now(UTC)
    with unit_of_work(env.sessions) as first_session:
        first = deliveries.due(first_session, now, limit=2)
        with unit_of_work(env.sessions) as second_session:
            second = deliveries.due(second_session, now, limit=2)
    assert len(first) == 2 and len(second) == 1
    assert not {d.delivery_id for d in first} & {d.delivery_id for d in second}
    with unit_of_work(env.sessions) as s:
        assert deliveries.due(s, now) == []

"""HL7 v2 results over MLLP: the sender (hl7apy) against a real MLLP listener on loopback built
on python-hl7, on a real SQLite database. Each answer of the RIS (AA, AE, AR, nothing, late,
nobody listening) ends delivered, retried or failed as docs/conformance.md section 6 says."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, MutableMapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import hl7
import pytest
import sqlalchemy as sa
import structlog
from structlog.testing import capture_logs

from daemon.config import HL7_VERSIONS, HL7DestinationConfig, load_config
from daemon.dicom.sender import DeliveryReason, send_due
from daemon.exceptions import ConfigError
from daemon.results.exceptions import MessageNotBuilt
from daemon.results.hl7 import build_oru, encode
from db import deliveries, jobs, migrate, queue, worklist
from db.engine import create_db_engine, make_session_factory, unit_of_work
from db.models import Delivery
from db.states import AuditAction, DeliveryKind, DeliveryState
from tests.conftest import free_port, wait_until, write_config
from tests.delivery_env import Env
from tests.mllp_listener import MLLPListener

ACCESSION = "ACC-0042"
STUDY_UID = "1.2.826.0.1.3680043.8.498.4242"
ERROR_TEXT = "SENTINEL order ACC-0042 is closed"


def _env(tmp_path: Path, port: int, *, max_attempts: int = 3, timeout_s: float = 1.0,
         extra: str = "") -> Env:
    config = load_config(write_config(tmp_path, (
        f'[delivery]\ntimeout_s = {timeout_s}\nmax_attempts = {max_attempts}\n'
        'retry_base_s = 5.0\nretry_max_s = 60.0\n'
        f'[[hl7_destinations]]\nname = "ris"\nhost = "127.0.0.1"\nport = {port}\n'
        'sending_application = "OPACITYD"\nsending_facility = "RADIOLOGY"\n'
        'receiving_application = "RIS"\nreceiving_facility = "HOSPITAL"\n' + extra)), env={})
    return Env.open(config)


def _score(env: Env, *, accession: str | None = ACCESSION, study_uid: str = STUDY_UID,
           probability: float | None = 0.734, sop_suffix: int = 1) -> bool | None:
    """One scoring of the study recorded as the worker does it (instance, quiet study, claimed
    job, finish_job with the HL7 destination); a second call is a late instance: a new
    revision and a result that supersedes the first."""
    now = datetime.now(UTC)
    with unit_of_work(env.sessions) as s:
        queue.record_instance(s, queue.InstanceRecord(
            study_uid=study_uid, series_uid=f"{study_uid}.1",
            sop_instance_uid=f"{study_uid}.1.{sop_suffix}",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1", transfer_syntax_uid="1.2.840.10008.1.2.1",
            modality="DX", body_part="CHEST", view_position="PA", accession_number=accession,
            eligible=True, eligibility_reason="eligible", spool_path=None, size_bytes=1,
            calling_ae="MODALITY", content_hash=f"{sop_suffix:064x}"), now)
        queue.complete_quiet_studies(s, timedelta(0), now)
    with unit_of_work(env.sessions) as s:
        (job,) = jobs.claim_jobs(s, "test", timedelta(minutes=5), now, 1)
    record = jobs.ResultRecord(
        model_name="opacity-test", model_version="1.0.0", model_validated=False,
        probability=probability, decision=None if probability is None else probability >= 0.5,
        threshold=0.5, urgent_threshold=0.9, elevated_threshold=0.5,
        priority="not_analysable" if probability is None else "elevated",
        inference_seconds=0.0, sr_sop_instance_uid=f"2.25.{job.job_id}{sop_suffix}",
        sr_series_uid="2.25.1", sr_path=f"sr/{job.job_id}.dcm", detail={})
    with unit_of_work(env.sessions) as s:
        return jobs.finish_job(s, job, "test", record, [], now, ["ris"])


def _send(env: Env) -> tuple[int, list[MutableMapping[str, Any]]]:
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        sent = send_due(env.config, env.sessions, env.spool)
    return sent, logs


def _assert_private(logs: list[MutableMapping[str, Any]], listener: MLLPListener) -> None:
    """No log event carries the accession number, the RIS's text or any message segment."""
    text = repr(logs)
    assert ACCESSION not in text and "SENTINEL" not in text
    assert "MSH|" not in text and "OBX|" not in text and "ORC|" not in text
    for raw in listener.raw:
        assert raw not in text


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def listeners() -> Iterator[list[MLLPListener]]:
    started: list[MLLPListener] = []
    yield started
    for listener in started:
        listener.stop()


def test_an_acknowledged_result_is_delivered_with_the_accession_and_the_sr_codes(
        tmp_path: Path, port: int, listeners: list[MLLPListener]) -> None:
    listener = MLLPListener(port)
    listeners.append(listener)
    env = _env(tmp_path, port)
    assert _score(env) is True
    sent, logs = _send(env)
    assert sent == 1 and listener.problems == []
    (d,) = env.deliveries()
    assert (d.kind, d.state, d.attempts, d.last_reason) == (DeliveryKind.HL7, DeliveryState.DELIVERED,
                                                             1, "delivered")
    assert d.message_control_id and listener.control_ids() == [d.message_control_id]
    (message,) = listener.received
    assert str(message["MSH.3"]) == "OPACITYD" and str(message["MSH.5"]) == "RIS"
    assert str(message["MSH.12"]) == "2.5.1"
    for where in ("ORC.2", "ORC.3", "OBR.2", "OBR.3"):
        assert str(message[where]) == ACCESSION
    assert str(message["OBR.25"]) == "F"
    assert str(message.segment("OBR")[4]) == "399208008^Plain chest X-ray^SCT"
    assert "NOT FOR CLINICAL USE" in str(message.segment("NTE")[3])
    assert listener.observations() == {
        "110180": ("ST", STUDY_UID),
        "OPA-001": ("NM", "0.734"),
        "112001": ("CWE", "52101004^Present^SCT"),
        "OPA-002": ("NM", "0.5"),
        "OPA-003": ("CWE", "PRI-ELEVATED^Elevated^99OPACITYD"),
        "111001": ("ST", "opacity-test"),
        "111003": ("ST", "1.0.0"),
    }
    (event,) = [e for e in logs if e["event"] == "hl7_delivered"]
    assert (event["message_control_id"], event["kind"], event["detail"]) == (
        d.message_control_id, "hl7", "AA")
    _assert_private(logs, listener)
    (sent_row,) = env.audit(AuditAction.DELIVERY_SENT)
    assert '"kind": "hl7"' in (sent_row.detail or "")
    assert d.message_control_id in (sent_row.detail or "")
    with unit_of_work(env.sessions) as s:
        study = worklist.find_study(s, STUDY_UID)
        assert study is not None
        history = worklist.study_history(s, study, show_identifiers=False)
        listed = deliveries.listing(s, tuple(DeliveryState))
    (entry,) = history["deliveries"]
    assert (entry["kind"], entry["destination"], entry["state"], entry["message_control_id"]) == (
        "hl7", "ris", "delivered", d.message_control_id)
    assert [(r.kind, r.message_control_id) for r in listed] == [(DeliveryKind.HL7,
                                                                 d.message_control_id)]
    if os.environ.get("OPACITYD_HL7_EXAMPLE"):  # docs/conformance.md quotes this message
        Path(os.environ["OPACITYD_HL7_EXAMPLE"]).write_text(listener.raw[0].replace("\r", "\n"))


def test_an_application_error_fails_at_once_keeping_the_ris_text(
        tmp_path: Path, port: int, listeners: list[MLLPListener]) -> None:
    listener = MLLPListener(port, answer="AE", error_text=ERROR_TEXT)
    listeners.append(listener)
    env = _env(tmp_path, port)
    _score(env)
    sent, logs = _send(env)
    (d,) = env.deliveries()
    assert (sent, d.state, d.attempts, d.last_reason) == (0, DeliveryState.FAILED, 1,
                                                          DeliveryReason.ACK_ERROR.value)
    assert d.last_detail == f"AE {ERROR_TEXT}"
    (alert,) = [e for e in logs if e["event"] == "delivery_failed_alert"]
    assert (alert["log_level"], alert["final"], alert["detail"], alert["kind"]) == (
        "critical", "permanent", "AE", "hl7")
    _assert_private(logs, listener)
    (failed,) = env.audit(AuditAction.DELIVERY_FAILED)
    assert "ack_error" in (failed.detail or "") and "SENTINEL" not in (failed.detail or "")
    with unit_of_work(env.sessions) as s:  # `opacityd deliveries --json` shows operators the text
        (row,) = deliveries.listing(s, (DeliveryState.FAILED,))
    assert (row.kind, row.last_reason, row.last_detail) == (DeliveryKind.HL7, "ack_error",
                                                            f"AE {ERROR_TEXT}")


def test_a_rejection_fails_at_once(tmp_path: Path, port: int,
                                   listeners: list[MLLPListener]) -> None:
    listeners.append(MLLPListener(port, answer="AR", error_text="unsupported version"))
    env = _env(tmp_path, port)
    _score(env)
    _send(env)
    (d,) = env.deliveries()
    assert (d.state, d.last_reason, d.last_detail) == (DeliveryState.FAILED, "ack_rejected",
                                                       "AR unsupported version")


def test_a_ris_that_is_down_is_retried_and_gets_the_message_once_it_is_up(
        tmp_path: Path, port: int, listeners: list[MLLPListener]) -> None:
    env = _env(tmp_path, port)
    _score(env)
    before = datetime.now(UTC)
    _, logs = _send(env)
    (d,) = env.deliveries()
    assert (d.state, d.attempts, d.last_reason) == (DeliveryState.PENDING, 1, "unreachable")
    assert "refused the connection" in (d.last_detail or "")
    assert d.next_attempt_at > before + timedelta(seconds=2.4)  # retry_base_s 5, jitter 0.5
    assert [e["event"] for e in logs if e["event"].startswith("delivery_")] == ["delivery_retry"]
    listener = MLLPListener(port)
    listeners.append(listener)
    env.make_due()
    sent, _ = _send(env)
    (d,) = env.deliveries()
    assert (sent, d.state, d.attempts) == (1, DeliveryState.DELIVERED, 2)
    assert listener.control_ids() == [d.message_control_id] and listener.problems == []


def test_a_slow_ack_is_retried_with_the_same_message_control_id(
        tmp_path: Path, port: int, listeners: list[MLLPListener]) -> None:
    hold = threading.Event()
    listener = MLLPListener(port, hold=hold)
    listeners.append(listener)
    env = _env(tmp_path, port)
    _score(env)
    _send(env)  # the RIS reads the message but answers only after our 1 s timeout
    (d,) = env.deliveries()
    assert (d.state, d.attempts, d.last_reason) == (DeliveryState.PENDING, 1, "no_ack")
    assert "no acknowledgement within 1 s" in (d.last_detail or "")
    hold.set()
    listener.hold = None
    env.make_due()
    sent, _ = _send(env)
    (d,) = env.deliveries()
    assert (sent, d.state, d.attempts) == (1, DeliveryState.DELIVERED, 2)
    # A retransmission is the same message: the RIS can recognise it by MSH-10.
    assert listener.control_ids() == [d.message_control_id] * 2


def test_an_ack_slower_than_usual_but_within_the_timeout_delivers(
        tmp_path: Path, port: int, listeners: list[MLLPListener]) -> None:
    hold = threading.Event()
    listener = MLLPListener(port, hold=hold)
    listeners.append(listener)
    env = _env(tmp_path, port, timeout_s=30.0)
    _score(env)
    # The RIS answers only once the test has seen the message arrive.
    threading.Thread(target=lambda: (wait_until(lambda: bool(listener.received),
                                                what="the message at the RIS"), hold.set()),
                     daemon=True).start()
    sent, _ = _send(env)
    (d,) = env.deliveries()
    assert (sent, d.state, d.attempts) == (1, DeliveryState.DELIVERED, 1)


def test_no_ack_until_the_attempts_are_spent_dead_letters_with_an_alert(
        tmp_path: Path, port: int, listeners: list[MLLPListener]) -> None:
    listener = MLLPListener(port, answer=None)
    listeners.append(listener)
    env = _env(tmp_path, port, max_attempts=2)
    _score(env)
    _send(env)
    env.make_due()
    _, logs = _send(env)
    (d,) = env.deliveries()
    assert (d.state, d.attempts, d.last_reason) == (DeliveryState.FAILED, 2, "no_ack")
    (alert,) = [e for e in logs if e["event"] == "delivery_failed_alert"]
    assert (alert["log_level"], alert["final"], alert["message_control_id"]) == (
        "critical", "attempts_exhausted", d.message_control_id)
    assert len(listener.received) == 2 and listener.problems == []
    _assert_private(logs, listener)


def test_a_superseding_result_is_sent_as_a_correction(
        tmp_path: Path, port: int, listeners: list[MLLPListener]) -> None:
    listener = MLLPListener(port)
    listeners.append(listener)
    env = _env(tmp_path, port)
    _score(env)
    _send(env)
    _score(env, probability=0.2, sop_suffix=2)  # a late instance: revision 2, a new result
    _send(env)
    assert [str(m["OBR.25"]) for m in listener.received] == ["F", "C"]
    assert {str(obx[11]) for obx in listener.received[1].segments("OBX")} == {"C"}
    assert listener.observations(1)["112001"] == ("CWE", "2667000^Absent^SCT")
    first, second = env.deliveries()
    assert first.message_control_id != second.message_control_id
    assert listener.problems == []


def test_a_study_without_an_accession_number_gets_no_message_and_a_recorded_reason(
        tmp_path: Path, port: int, listeners: list[MLLPListener]) -> None:
    listener = MLLPListener(port)
    listeners.append(listener)
    env = _env(tmp_path, port)
    _score(env, accession=None)
    sent, _ = _send(env)
    assert (sent, env.deliveries(), listener.received) == (0, [], [])
    (skipped,) = env.audit(AuditAction.DELIVERY_SKIPPED)
    assert skipped.study_uid == STUDY_UID
    assert '"reason": "no_accession_number"' in (skipped.detail or "")
    assert '"kind": "hl7"' in (skipped.detail or "")


def test_an_unscored_study_reports_only_its_priority(
        tmp_path: Path, port: int, listeners: list[MLLPListener]) -> None:
    listener = MLLPListener(port)
    listeners.append(listener)
    env = _env(tmp_path, port)
    _score(env, probability=None)
    assert _send(env)[0] == 1
    assert set(listener.observations()) == {"110180", "OPA-003", "111001", "111003"}
    assert listener.observations()["OPA-003"] == ("CWE", "PRI-NOT_ANALYSABLE^Not analysable^99OPACITYD")


def test_shadow_mode_sends_nothing(tmp_path: Path, port: int,
                                   listeners: list[MLLPListener]) -> None:
    listener = MLLPListener(port)
    listeners.append(listener)
    env = _env(tmp_path, port, extra="")
    shadow = load_config(write_config(tmp_path / "shadow", (
        f'[delivery]\nenabled = false\n[[hl7_destinations]]\nname = "ris"\nhost = "127.0.0.1"\n'
        f'port = {port}\n')), env={})
    _score(env)
    assert send_due(shadow, env.sessions, env.spool) == 0
    assert listener.received == [] and env.deliveries()[0].attempts == 0


def test_resend_queues_the_same_message_again(tmp_path: Path, port: int,
                                              listeners: list[MLLPListener]) -> None:
    listener = MLLPListener(port, answer="AE", error_text=ERROR_TEXT)
    listeners.append(listener)
    env = _env(tmp_path, port)
    _score(env)
    _send(env)
    assert env.deliveries()[0].state == DeliveryState.FAILED
    listener.answer, listener.error_text = "AA", ""
    with unit_of_work(env.sessions) as s:
        assert deliveries.resend(s, STUDY_UID, datetime.now(UTC), "operator:test") == 1
    assert _send(env)[0] == 1
    (d,) = env.deliveries()
    assert d.state == DeliveryState.DELIVERED
    assert listener.control_ids() == [d.message_control_id] * 2
    (requeued,) = env.audit(AuditAction.DELIVERY_REQUEUED)
    assert '"kind": "hl7"' in (requeued.detail or "")


@pytest.mark.parametrize("version", HL7_VERSIONS)
def test_the_message_is_built_in_each_accepted_version_and_escapes_delimiters(version: str) -> None:
    content = deliveries.ResultMessage(
        message_control_id="0123456789ABCDEF0123", study_uid=STUDY_UID,
        accession_number="A|B^C&D~E\\F", correction=False, model_name="net^work",
        model_version="2|0", model_validated=True, probability=0.5, decision=True,
        threshold=0.5, priority="elevated", scored_at=datetime.now(UTC))
    dest = HL7DestinationConfig(name="ris", host="h", receiving_application="RIS", version=version)
    text = encode(build_oru(content, dest, datetime.now(UTC))).decode()
    message = hl7.parse(text)  # the other library reads it
    assert str(message["MSH.12"]) == version
    assert message.unescape(str(message.segment("ORC")[2])) == "A|B^C&D~E\\F"
    assert "NTE" not in {str(s[0]) for s in message}  # a validated bundle: no warning note
    names = {str(obx[3][0][0]): message.unescape(str(obx[5])) for obx in message.segments("OBX")}
    assert (names["111001"], names["111003"]) == ("net^work", "2|0")


def test_a_result_without_an_accession_number_is_no_message() -> None:
    content = deliveries.ResultMessage(
        message_control_id="X", study_uid=STUDY_UID, accession_number="  ", correction=False,
        model_name="m", model_version="1", model_validated=True, probability=0.5, decision=True,
        threshold=0.5, priority="elevated", scored_at=datetime.now(UTC))
    with pytest.raises(MessageNotBuilt, match="no accession number"):
        build_oru(content, HL7DestinationConfig(name="ris", host="h"), datetime.now(UTC))


@pytest.mark.parametrize(("entry", "message"), [
    ('name = "ris"\nhost = "h"\nversion = "2.3"',
     "hl7_destinations[0].version = '2.3': expected one of 2.5, 2.5.1, 2.6, 2.7"),
    ('name = "ris"\nhost = "h"\nreceiving_application = "R|S"',
     "hl7_destinations[0].receiving_application = 'R|S': expected printable ASCII"),
    ('name = "ris"\nhost = ""', "hl7_destinations[0].host = '': expected a host name"),
    ('name = "ris"\nhost = "h"\nport = 0', "hl7_destinations[0].port = 0: expected an integer"),
    ('host = "h"', "hl7_destinations[0].name = '': expected a unique, non-empty name"),
])
def test_a_bad_hl7_destination_stops_start_up_naming_key_and_value(
        tmp_path: Path, entry: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(write_config(tmp_path, f"[[hl7_destinations]]\n{entry}\n"), env={})
    assert message in str(raised.value)


def test_migration_0005_makes_existing_deliveries_sr_deliveries(database_url: str) -> None:
    """A database at 0004 with an SR delivery, upgraded: the row is kind sr, and the same
    result and destination may now also have an hl7 delivery (but not a second sr one)."""
    from alembic import command

    engine = create_db_engine(database_url)
    cfg = migrate._alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0004")
    now = datetime(2026, 12, 1, 12, 0)
    with engine.begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO studies (id, study_uid, state, revision, first_received_at, "
            "last_received_at) VALUES (1, '1.2.3', 'complete', 1, :t, :t)"), {"t": now})
        conn.execute(sa.text(
            "INSERT INTO jobs (id, study_id, study_revision, state, created_at, updated_at, "
            "attempts) VALUES (1, 1, 1, 'done', :t, :t, 1)"), {"t": now})
        conn.execute(sa.text(
            "INSERT INTO results (id, job_id, study_id, study_revision, model_name, model_version,"
            " model_validated, threshold, priority, sr_sop_instance_uid, sr_series_uid, sr_path,"
            " detail, created_at) VALUES (1, 1, 1, 1, 'm', '1', false, 0.5, 'routine', '2.25.1',"
            " '2.25.2', 'sr/x.dcm', '{}', :t)"), {"t": now})
        conn.execute(sa.text(
            "INSERT INTO deliveries (result_id, destination, state, attempts, next_attempt_at,"
            " created_at) VALUES (1, 'pacs', 'delivered', 1, :t, :t)"), {"t": now})
    assert migrate.upgrade(engine) == ("0004", migrate.head_revision())
    sessions = make_session_factory(engine)
    with unit_of_work(sessions) as s:
        (old,) = s.scalars(sa.select(Delivery))
        assert (old.kind, old.message_control_id) == (DeliveryKind.SR, None)
        s.add(Delivery(result_id=1, destination="pacs", kind=DeliveryKind.HL7,
                       message_control_id="A" * 20, state=DeliveryState.PENDING, attempts=0,
                       next_attempt_at=datetime.now(UTC), created_at=datetime.now(UTC)))
    with pytest.raises(sa.exc.IntegrityError), unit_of_work(sessions) as s:
        s.add(Delivery(result_id=1, destination="pacs", kind=DeliveryKind.SR,
                       state=DeliveryState.PENDING, attempts=0,
                       next_attempt_at=datetime.now(UTC), created_at=datetime.now(UTC)))
    engine.dispose()

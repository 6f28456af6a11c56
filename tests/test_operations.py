"""Operations: worklist order, retention, the disk watermark, HTTP health/metrics/API, systemd
notification and units. Database-level tests drive the real queue functions on a real SQLite
file; process-level tests run `opacityd serve` with its worker and real DICOM peers."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from daemon.config import load_config
from daemon.retention import purge
from db import deliveries, jobs, queue, worklist
from db.engine import unit_of_work
from db.models import AuditEvent, Instance
from db.states import AuditAction
from tests.conftest import (
    OPACITYD,
    REPO,
    Harness,
    echoscu,
    free_port,
    mounted_tmpfs,
    running_receiver,
    storescu,
    wait_until,
    write_config,
)
from tests.daemon_process import DaemonProcess, start_daemon
from tests.test_end_to_end import _study

DAY = timedelta(days=1)


def _scored_study(h: Harness, n: int, priority: str, probability: float | None, received: datetime,
                  *, destinations: tuple[str, ...] = (), eligible: bool = True) -> str:
    """A study through the real queue functions: received, closed, claimed, scored."""
    study_uid = f"1.2.826.0.1.3680043.8.498.77.{n}"
    sop_uid = f"{study_uid}.1"
    relative = h.spool.relative_path(study_uid, f"{study_uid}.0", sop_uid)
    h.spool.write(relative, [b"x" * 100])
    record = queue.InstanceRecord(study_uid=study_uid, series_uid=f"{study_uid}.0", sop_instance_uid=sop_uid,
                                  sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
                                  transfer_syntax_uid="1.2.840.10008.1.2.1", modality="DX",
                                  body_part="CHEST", view_position="PA" if eligible else "LL",
                                  accession_number=f"ACC{n}", eligible=eligible,
                                  eligibility_reason="eligible" if eligible else "lateral_view",
                                  spool_path=relative, size_bytes=100, calling_ae="MODALITY")
    with unit_of_work(h.sessions) as s:
        queue.record_instance(s, record, received)
    with unit_of_work(h.sessions) as s:
        queue.complete_quiet_studies(s, timedelta(seconds=1), received + timedelta(seconds=10))
    if not eligible:
        return study_uid
    with unit_of_work(h.sessions) as s:
        (claimed,) = jobs.claim_jobs(s, "test", timedelta(minutes=5), received + timedelta(seconds=11), 1)
        result = jobs.ResultRecord(
            model_name="m", model_version="1", model_validated=False, probability=probability,
            decision=None if probability is None else probability >= 0.5, threshold=0.5,
            urgent_threshold=0.9, elevated_threshold=0.6, priority=priority, inference_seconds=0.2,
            sr_sop_instance_uid=f"{study_uid}.99", sr_series_uid=f"{study_uid}.98",
            sr_path=f"sr/{study_uid}/x.dcm", detail={})
        jobs.finish_job(s, claimed, "test", result, list(destinations), received + timedelta(seconds=12))
    return study_uid


def test_worklist_orders_by_priority_then_oldest_first_and_hides_identifiers(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    with running_receiver(tmp_path) as h:
        plan = [("routine", 0.2, 5), ("urgent", 0.95, 1), ("not_analysable", None, 9),
                ("urgent", 0.97, 3), ("elevated", 0.7, 2), ("urgent", 0.91, 2)]
        for n, (priority, p, hours_ago) in enumerate(plan):
            _scored_study(h, n, priority, p, now - timedelta(hours=hours_ago))
        entries = h.query(lambda s: worklist.worklist(s))
        assert [(e.priority, e.probability) for e in entries] == [
            ("urgent", 0.97), ("urgent", 0.91), ("urgent", 0.95), ("elevated", 0.7), ("routine", 0.2),
            ("not_analysable", None)]
        assert all(e.delivery == "not_sent" for e in entries)
        recent = h.query(lambda s: worklist.worklist(s, ["urgent", "routine"], now - timedelta(hours=2.5)))
        assert [e.probability for e in recent] == [0.91, 0.95]
        hidden = entries[0].to_json(False, now)
        assert "study_uid" not in hidden and "accession_number" not in hidden and hidden["study"] > 0
        shown = entries[0].to_json(True, now)
        assert shown["study_uid"].startswith("1.2.826") and shown["accession_number"] == "ACC3"


def test_purge_deletes_delivered_and_ineligible_pixels_keeps_rows_and_audits(tmp_path: Path) -> None:
    old = datetime.now(UTC) - 3 * DAY
    with running_receiver(tmp_path, "[retention]\ndelivered_hours = 24.0\nineligible_hours = 1.0\n") as h:
        delivered = _scored_study(h, 1, "routine", 0.1, old, destinations=("pacs",))
        pending = _scored_study(h, 2, "urgent", 0.99, old, destinations=("pacs",))
        shadow = _scored_study(h, 3, "routine", 0.2, old)  # nothing to send: purged after its result
        recent = _scored_study(h, 4, "routine", 0.2, datetime.now(UTC), destinations=("pacs",))
        lateral = _scored_study(h, 5, "routine", None, old, eligible=False)
        with unit_of_work(h.sessions) as s:
            for d in deliveries.due(s, datetime.now(UTC)):
                if d.study_uid in (delivered, recent):
                    deliveries.mark_delivered(s, d.delivery_id, old + timedelta(minutes=1)
                                              if d.study_uid == delivered else datetime.now(UTC), "ok")
        files = {uid: h.spool.absolute(h.spool.relative_path(uid, f"{uid}.0", f"{uid}.1"))
                 for uid in (delivered, pending, shadow, recent, lateral)}
        dry = purge(h.config, h.sessions, h.spool, dry_run=True)
        assert sorted(c.study_uid for c in dry.candidates) == sorted([delivered, shadow, lateral])
        assert all(p.exists() for p in files.values())
        listing = _cli(tmp_path / "config.toml", "purge", "--dry-run")
        assert "would delete 3 spooled file(s)" in listing.stdout, listing.stdout + listing.stderr
        assert all(p.exists() for p in files.values())
        done = purge(h.config, h.sessions, h.spool)
        assert (done.files, done.studies) == (3, 3)
        assert {uid for uid, p in files.items() if not p.exists()} == {delivered, shadow, lateral}
        rows = h.query(lambda s: {i.sop_instance_uid[:-2]: i.purged_at
                                  for i in s.scalars(sa.select(Instance))})
        assert rows[pending] is None and rows[recent] is None and rows[delivered] is not None
        events = h.query(lambda s: list(s.scalars(sa.select(AuditEvent).where(
            AuditEvent.action == AuditAction.STUDY_PURGED))))
        assert {e.study_uid for e in events} == {delivered, shadow, lateral}
        lateral_event = next(e for e in events if e.study_uid == lateral)
        assert json.loads(lateral_event.detail) == {"files": {"ineligible": 1}}
        assert purge(h.config, h.sessions, h.spool).files == 0  # nothing twice
        assert h.query(lambda s: jobs.job_inputs(s, 1))[0].spool_path is None  # no longer an input


def _cli(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([OPACITYD, "--config", str(cfg), *args], capture_output=True, text=True,
                          timeout=120)


def _get(url: str, token: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


TOKEN = "s3cret-token-for-tests"


def test_http_health_metrics_worklist_and_the_audit_trail(tmp_path: Path, shared_dicom: Path,
                                                          demo_bundle: Path,
                                                          daemons: list[DaemonProcess]) -> None:
    daemon, cfg = start_daemon(
        tmp_path, daemons,
        f'[http]\ntoken = "{TOKEN}"\n[worker]\npoll_interval_s = 0.2\n', bundle=demo_bundle)
    config = load_config(cfg, env={})
    base = f"http://127.0.0.1:{config.http.port}"
    assert _get(f"{base}/healthz")[0] == 401  # a token is configured: every request needs it
    status, body = _get(f"{base}/healthz", TOKEN)
    assert status == 200 and json.loads(body)["alive"] is True
    wait_until(lambda: _get(f"{base}/readyz", TOKEN)[0] == 200, timeout=120, what="the worker's model")
    pa, lateral = _study(shared_dicom, tmp_path / "in")
    _, acks = storescu(daemon.port, [pa, lateral])
    assert set(acks.values()) == {"Success"}
    _, rejected = storescu(daemon.port, [pa], aec="SOMEONE_ELSE")
    wait_until(lambda: json.loads(_get(f"{base}/api/v1/worklist", TOKEN)[1])["studies"], timeout=120,
               what="a scored study")
    (entry,) = json.loads(_get(f"{base}/api/v1/worklist", TOKEN)[1])["studies"]
    assert "study_uid" not in entry and "NOT FOR CLINICAL USE" not in entry["model"]
    assert entry["delivery"] == "not_sent" and entry["model_validated"] is False
    status, body = _get(f"{base}/api/v1/worklist?level=nonsense", TOKEN)
    assert status == 400 and b"unknown level" in body
    metrics = _get(f"{base}/metrics", TOKEN)[1].decode()
    for line in ('opacityd_instances_received_total{eligible="true",reason="eligible"} 1.0',
                 'opacityd_instances_received_total{eligible="false",reason="lateral_view"} 1.0',
                 'opacityd_associations_rejected_total{reason="called_ae_not_recognized"} 1.0',
                 'opacityd_jobs{state="done"} 1.0', 'opacityd_inference_seconds_count 1.0',
                 'opacityd_model_info{name="opacity-xception-UNTRAINED-DEMO"'):
        assert line in metrics, line
    study_uid = str(_dicom_uid(pa))
    status, body = _get(f"{base}/api/v1/studies/{study_uid}", TOKEN)
    history = json.loads(body)
    assert status == 200 and "study_uid" not in history and len(history["instances"]) == 2
    (result,) = history["results"]
    assert result["thresholds"]["decision"] == 0.5 and result["priority"] == entry["priority"]
    actions = [e["action"] for e in history["audit"]]
    for action in ("instance_received", "study_completed", "job_enqueued", "job_claimed",
                   "result_recorded", "job_done"):
        assert action in actions, actions
    assert _get(f"{base}/api/v1/studies/1.2.3.4", TOKEN)[0] == 404

    audit = _cli(cfg, "audit", study_uid)
    assert audit.returncode == 0 and "result_recorded" in audit.stdout and study_uid in audit.stdout
    listing = _cli(cfg, "worklist", "--json")
    assert json.loads(listing.stdout)["studies"][0]["priority"] == entry["priority"]
    assert "NOT FOR CLINICAL USE" in _cli(cfg, "worklist").stdout
    assert daemon.terminate() == 0


def _dicom_uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def test_configured_thresholds_override_the_bundle_and_are_recorded(
        tmp_path: Path, shared_dicom: Path, demo_bundle: Path, daemons: list[DaemonProcess]) -> None:
    port = free_port()
    cfg = write_config(tmp_path / "d", "[worker]\npoll_interval_s = 0.2\n", port=port, bundle=demo_bundle)
    cfg.write_text(cfg.read_text().replace(
        "[model]\n", "[model]\ndecision_threshold = 0.0\nurgent_threshold = 0.0\nelevated_threshold = 0.0\n"))
    daemon = DaemonProcess(cfg, tmp_path / "daemon.log", port).start()
    daemons.append(daemon)
    pa, _ = _study(shared_dicom, tmp_path / "in")
    storescu(daemon.port, [pa])
    wait_until(lambda: json.loads(_cli(cfg, "worklist", "--json").stdout)["studies"], timeout=120,
               what="a scored study")
    history = json.loads(_cli(cfg, "audit", "--json", _dicom_uid(pa)).stdout)
    (result,) = history["results"]
    assert result["priority"] == "urgent" and result["decision"] is True
    assert result["thresholds"] == {"decision": 0.0, "urgent": 0.0, "elevated": 0.0}


class _NotifySocket:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(120)
        self.path = path

    def next(self) -> str:
        return self.sock.recv(4096).decode()


def test_serve_tells_systemd_ready_watchdog_and_stopping(tmp_path: Path, demo_bundle: Path,
                                                         daemons: list[DaemonProcess]) -> None:
    notify = _NotifySocket(tmp_path / "notify.sock")
    daemon, cfg = start_daemon(tmp_path, daemons, bundle=demo_bundle,
                               env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000"})
    messages = [notify.next()]
    while not messages[-1].startswith("READY=1"):
        messages.append(notify.next())
    # READY only once the SCP answers and the worker has the model: the echo works now.
    assert echoscu(daemon.port).returncode == 0
    assert "worker" in daemon.output() and '"event": "ready"' in daemon.output()
    pings = [m for m in (notify.next() for _ in range(3))]
    assert pings.count("WATCHDOG=1") >= 2
    assert daemon.proc is not None
    daemon.proc.send_signal(15)
    rest = []
    while "STOPPING=1" not in rest:
        rest.append(notify.next())
    assert daemon.proc.wait(timeout=60) == 0


@pytest.fixture
def spool_tmpfs(tmp_path: Path) -> Iterator[Path]:
    with mounted_tmpfs(tmp_path / "d" / "state" / "spool", "48m") as mount:
        yield mount


def test_disk_watermark_refuses_with_0xA700_and_recovers_by_itself(
        tmp_path: Path, spool_tmpfs: Path, shared_dicom: Path, demo_bundle: Path,
        daemons: list[DaemonProcess]) -> None:
    daemon, cfg = start_daemon(tmp_path, daemons, "min_free_disk_mb = 24\n", bundle=demo_bundle)
    base = f"http://127.0.0.1:{load_config(cfg, env={}).http.port}"
    ballast = spool_tmpfs / "ballast"
    ballast.write_bytes(b"\0" * (30 * 2**20))
    pa, _ = _study(shared_dicom, tmp_path / "in")
    wait_until(lambda: json.loads(_get(f"{base}/readyz")[1])["checks"]["disk"]["ok"] is False, timeout=10,
               what="/readyz to report the disk")
    proc, acks = storescu(daemon.port, [pa])
    assert list(acks.values()) == ["Refused: OutOfResources"], proc.stdout + proc.stderr
    assert "disk_below_watermark" in daemon.output()
    status, body = _get(f"{base}/readyz")
    assert status == 503 and "disk" in json.loads(body)["failed"]
    assert echoscu(daemon.port).returncode == 0  # still serving
    ballast.unlink()
    wait_until(lambda: storescu(daemon.port, [pa])[1] == {pa: "Success"}, timeout=20,
               what="accepting again once space returned")
    assert "disk_above_watermark" in daemon.output()


def test_systemd_units_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    units = ("opacityd.service", "opacityd-worker@.service", "opacityd-receiver@.service",
             "opacityd-gpu-worker@.service")
    for unit in units:
        text = (REPO / "deploy" / unit).read_text().replace("/opt/opacityd/venv/bin/opacityd", OPACITYD)
        (tmp_path / unit).write_text(text)
    proc = subprocess.run([analyze, "verify", *(str(tmp_path / unit) for unit in units)],
                          capture_output=True, text=True, env={**os.environ, "SYSTEMD_LOG_LEVEL": "notice"})
    assert proc.returncode == 0, proc.stderr
    problems = [line for line in proc.stderr.splitlines() if "opacityd" in line]
    assert problems == [], problems
    assert "Type=notify" in (REPO / "deploy" / "opacityd.service").read_text()


def test_install_script_lays_out_a_service(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("install.sh must run as root")
    venv = Path(OPACITYD).parent.parent
    env = {**os.environ, "PREFIX": str(tmp_path / "opt"), "ETC_DIR": str(tmp_path / "etc"),
           "STATE_DIR": str(tmp_path / "state"), "UNIT_DIR": str(tmp_path / "units"), "SERVICE_USER": "root"}
    proc = subprocess.run(["sh", str(REPO / "deploy" / "install.sh"), "--venv", str(venv), "--low-port",
                           "--no-enable"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    config = load_config(tmp_path / "etc" / "config.toml", env={})
    assert config.state_dir == tmp_path / "state"
    unit = (tmp_path / "units" / "opacityd.service").read_text()
    assert f"ExecStart={OPACITYD} --config {tmp_path / 'etc'}/config.toml serve" in unit
    assert (tmp_path / "units" / "opacityd.service.d" / "low-port.conf").is_file()
    again = subprocess.run(["sh", str(REPO / "deploy" / "install.sh"), "--venv", str(venv), "--no-enable"],
                           capture_output=True, text=True, env=env, timeout=120)
    assert again.returncode == 0 and "kept the existing" in again.stdout


def test_serve_refuses_thresholds_that_put_elevated_above_urgent(tmp_path: Path, demo_bundle: Path) -> None:
    cfg = write_config(tmp_path / "d", bundle=demo_bundle)
    cfg.write_text(cfg.read_text().replace("[model]\n", "[model]\nurgent_threshold = 0.3\n"
                                           "elevated_threshold = 0.8\n"))
    proc = subprocess.run([OPACITYD, "--config", str(cfg), "serve"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "elevated threshold 0.8 exceeds urgent threshold 0.3" in proc.stderr


def test_watchdog_pings_stop_while_the_service_is_unhealthy(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A stopped scheduler fails liveness: no WATCHDOG=1, a STATUS naming it instead, so systemd
    restarts the service after WatchdogSec."""
    import threading

    from apscheduler.schedulers.background import BackgroundScheduler

    from daemon.disk import DiskGuard
    from daemon.serve import _run_until_stopped
    from daemon.web.health import Check, Health

    notify = _NotifySocket(tmp_path / "notify.sock")
    notify.sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify.path))
    monkeypatch.setenv("WATCHDOG_USEC", "400000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    with running_receiver(tmp_path) as h:
        scheduler = BackgroundScheduler()  # never started
        running = {"ok": False}
        health = Health(h.sessions, DiskGuard(h.spool.root, 0),
                        lambda: running["ok"] or bool(scheduler.running),
                        lambda: h.receiver.server is not None, lambda: Check(True, "loaded"))
        stop = threading.Event()
        loop = threading.Thread(target=_run_until_stopped, args=(stop, None, None, health))
        loop.start()
        try:
            messages = [notify.next() for _ in range(3)]
            assert messages[0].startswith("READY=1")
            assert "WATCHDOG=1" not in messages
            assert any(m.startswith("STATUS=unhealthy: scheduler") for m in messages), messages
            running["ok"] = True  # healthy again: the pings resume
            assert "WATCHDOG=1" in [notify.next() for _ in range(3)]
        finally:
            stop.set()
            loop.join(timeout=10)

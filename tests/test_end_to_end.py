"""The whole loop with real peers: storescu -> opacityd serve (+ worker) -> SR -> PACS."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
import sqlalchemy as sa
from PIL import Image

from daemon.config import load_config
from db.engine import create_db_engine, make_session_factory, unit_of_work
from db.models import AuditEvent, Delivery, Job, Result
from db.states import AuditAction, DeliveryKind, DeliveryState, JobState
from tests.conftest import (
    Pacs,
    free_port,
    require,
    storescu,
    wait_until,
    write_config,
)
from tests.daemon_process import DaemonProcess, start_daemon

FUJI = "fodicom_CR-MONO1-10-chest.dcm"


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[Pacs]:
    p = Pacs(tmp_path / "pacs", free_port())
    yield p
    p.stop()



def _destination(pacs: Pacs) -> str:
    return (f'[[destinations]]\nname = "pacs"\nhost = "127.0.0.1"\nport = {pacs.port}\n'
            f'called_ae = "PACS"\ncalling_ae = "OPACITYD"\n'
            # timeout 5 s: a delivery claimed by a killed serve is due again after 25 s
            '[delivery]\npoll_interval_s = 0.2\nretry_base_s = 0.5\nretry_max_s = 2.0\ntimeout_s = 5.0\n'
            '[worker]\npoll_interval_s = 0.2\nlease_s = 5.0\n')


def _study(shared_dicom: Path, folder: Path) -> tuple[Path, Path]:
    """The real Fuji PA chest and a lateral of the same study (same pixels, view LL)."""
    folder.mkdir(parents=True, exist_ok=True)
    pa = folder / "pa.dcm"
    ds = pydicom.dcmread(shared_dicom / FUJI, force=True)  # a bare data set: give it file meta
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    ds.save_as(pa, enforce_file_format=True)
    lateral = folder / "lateral.dcm"
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.ViewPosition = "LL"
    ds.save_as(lateral, enforce_file_format=True)
    return pa, lateral


def _sessions(cfg: Path):  # type: ignore[no-untyped-def]
    config = load_config(cfg, env={})
    return create_db_engine(config.database_url), config


def _one_study_in(tmp_path: Path, shared_dicom: Path, demo_bundle: Path, pacs: Pacs,
                  daemons: list[DaemonProcess], database_url: str = ""):  # type: ignore[no-untyped-def]
    """Start serve towards ``pacs`` (not necessarily up) and push the real PA study to it."""
    daemon, cfg = start_daemon(tmp_path, daemons, _destination(pacs), bundle=demo_bundle,
                               database_url=database_url)
    port = daemon.port
    pa, _ = _study(shared_dicom, tmp_path / "in")
    _, acks = storescu(port, [pa])
    assert acks == {pa: "Success"}
    engine, _ = _sessions(cfg)
    return daemon, cfg, engine, make_session_factory(engine)


def _delivery(sessions, state: DeliveryState) -> bool:  # type: ignore[no-untyped-def]
    """Every delivery (the SR and the summary image) is in ``state``."""
    with unit_of_work(sessions) as s:
        states = s.scalars(sa.select(Delivery.state)).all()
        return len(states) == 2 and set(states) == {state}


def test_study_pushed_by_storescu_arrives_at_the_pacs_as_one_valid_sr(
        tmp_path: Path, shared_dicom: Path, demo_bundle: Path, pacs: Pacs,
        daemons: list[DaemonProcess], database_url: str) -> None:
    pacs.start()
    daemon, cfg = start_daemon(tmp_path, daemons, _destination(pacs), bundle=demo_bundle,
                               database_url=database_url)
    port = daemon.port
    pa, lateral = _study(shared_dicom, tmp_path / "in")
    _, acks = storescu(port, [pa, lateral])
    assert set(acks.values()) == {"Success"}

    wait_until(lambda: pacs.srs() and pacs.summaries(), timeout=120,
               what="the SR and the summary image at the PACS")
    (sr_path,) = pacs.srs()
    (summary_path,) = pacs.summaries()
    for path in (sr_path, summary_path):
        errors = [line for line in subprocess.run(["/usr/bin/dciodvfy", str(path)], capture_output=True,
                                                  text=True).stderr.splitlines() if line.startswith("Error")]
        assert errors == [], path.name
    sr = pydicom.dcmread(sr_path)
    summary = pydicom.dcmread(summary_path)
    assert summary.StudyInstanceUID == sr.StudyInstanceUID
    pa_header = pydicom.dcmread(pa, stop_before_pixels=True)
    assert summary.SourceImageSequence[0].ReferencedSOPInstanceUID == pa_header.SOPInstanceUID
    for keyword in ("PatientID", "PatientName", "StudyID", "AccessionNumber"):  # filed as the image
        assert summary.get(keyword, "") == pa_header.get(keyword, ""), keyword
    pa_uid = pydicom.dcmread(pa, stop_before_pixels=True).SOPInstanceUID
    lateral_uid = pydicom.dcmread(lateral, stop_before_pixels=True).SOPInstanceUID
    assert sr.StudyInstanceUID == pydicom.dcmread(pa, stop_before_pixels=True).StudyInstanceUID
    rendered = subprocess.run(["/usr/bin/dsrdump", "+Pc", str(sr_path)], capture_output=True,
                              text=True).stdout
    assert "opacity-xception-UNTRAINED" in rendered and "NOT FOR CLINICAL USE" in rendered
    assert "Probability of lung opacity" in rendered
    evidence = {item.ReferencedSOPInstanceUID
                for study in sr.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence
                for item in series.ReferencedSOPSequence}
    assert evidence == {pa_uid}  # the lateral was never eligible, so it is not evidence

    engine, _ = _sessions(cfg)
    wait_until(lambda: _delivery(make_session_factory(engine), DeliveryState.DELIVERED), timeout=30,
               what="both deliveries recorded")
    with unit_of_work(make_session_factory(engine)) as s:
        (result,) = s.scalars(sa.select(Result)).all()
        assert result.summary_sop_instance_uid == summary.SOPInstanceUID
        kinds = {d.kind: d.state for d in s.scalars(sa.select(Delivery))}
        assert result.sr_sop_instance_uid == sr.SOPInstanceUID
        assert result.model_name == "opacity-xception-UNTRAINED-DEMO"
        assert kinds == {DeliveryKind.SR: DeliveryState.DELIVERED,
                         DeliveryKind.SUMMARY: DeliveryState.DELIVERED}
        assert '"ineligible"' in result.detail and lateral_uid in result.detail
    engine.dispose()
    assert daemon.terminate() == 0


def test_pacs_down_then_up_gets_the_sr_exactly_once(tmp_path: Path, shared_dicom: Path,
                                                    demo_bundle: Path, pacs: Pacs,
                                                    daemons: list[DaemonProcess]) -> None:
    daemon, cfg, engine, sessions = _one_study_in(tmp_path, shared_dicom, demo_bundle, pacs, daemons)

    def retried() -> bool:
        with unit_of_work(sessions) as s:
            d = s.scalar(sa.select(Delivery).where(Delivery.kind == DeliveryKind.SR))
            return d is not None and d.attempts >= 2 and d.last_reason == "unreachable"
    wait_until(retried, timeout=120, what="failed delivery attempts while the PACS is down")
    pacs.start()
    wait_until(lambda: _delivery(sessions, DeliveryState.DELIVERED), timeout=60,
               what="delivery after the PACS came up")
    assert len(pacs.srs()) == 1 and len(pacs.summaries()) == 1
    engine.dispose()
    assert daemon.terminate() == 0


def test_killed_worker_mid_job_is_reclaimed_and_one_sr_arrives(
        tmp_path: Path, shared_dicom: Path, demo_bundle: Path, pacs: Pacs,
        daemons: list[DaemonProcess], database_url: str) -> None:
    pacs.start()
    daemon, cfg = start_daemon(tmp_path, daemons, _destination(pacs), bundle=demo_bundle,
                               database_url=database_url)
    port = daemon.port
    engine, _ = _sessions(cfg)
    sessions = make_session_factory(engine)
    pa, _ = _study(shared_dicom, tmp_path / "in")
    # Kill the worker as soon as it has claimed the job, before it can finish it.
    storescu(port, [pa])

    def claimed_by() -> str | None:
        with unit_of_work(sessions) as s:
            job = s.scalar(sa.select(Job))
            return job.lease_owner if job is not None and job.state == JobState.RUNNING else None
    owner = wait_until(claimed_by, timeout=60, interval=0.005, what="the job to be claimed")
    pid = int(owner.split(":")[1])
    os.kill(pid, signal.SIGSTOP)  # freeze it mid-job, then check it still holds the job
    with unit_of_work(sessions) as s:
        assert s.scalar(sa.select(Job.state)) == JobState.RUNNING
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: pacs.srs(), timeout=120, what="the SR after the worker was restarted")
    with unit_of_work(sessions) as s:
        job = s.scalar(sa.select(Job))
        assert job is not None and job.state == JobState.DONE
        assert s.scalar(sa.select(sa.func.count()).select_from(Result)) == 1
        claims = s.scalar(sa.select(sa.func.count()).select_from(AuditEvent)
                          .where(AuditEvent.action == AuditAction.JOB_CLAIMED))
        assert claims == 2  # claimed by the killed worker, then reclaimed after its lease
    assert len(pacs.srs()) == 1
    assert "worker_process_exited" in daemon.output()
    engine.dispose()
    assert daemon.terminate() == 0


ORTHANC = "/usr/sbin/Orthanc"


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[tuple[str, int, int]]:
    """A real Orthanc on loopback, with opacityd registered as a modality it can push to."""
    require(ORTHANC)
    http_port, dicom_port, our_port = free_port(), free_port(), free_port()
    folder = tmp_path / "orthanc"
    folder.mkdir()
    config = {
        "Name": "test-pacs", "StorageDirectory": str(folder / "st"),
        "IndexDirectory": str(folder / "idx"), "HttpPort": http_port, "DicomPort": dicom_port,
        "DicomAet": "ORTHANC", "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "DicomModalities": {"opacityd": ["OPACITYD", "127.0.0.1", our_port]},
        "DicomAlwaysAllowStore": True, "Plugins": [],
    }
    (folder / "config.json").write_text(json.dumps(config))
    proc = subprocess.Popen([ORTHANC, str(folder / "config.json")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{http_port}"

    def up() -> bool:
        try:
            with urllib.request.urlopen(f"{base}/system", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False
    try:
        wait_until(up, timeout=60, interval=0.2, what="Orthanc to answer")
        yield base, dicom_port, our_port
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _rest(base: str, path: str, body: bytes | None = None) -> object:
    request = urllib.request.Request(f"{base}{path}", data=body, method="POST" if body is not None
                                     else "GET")
    with urllib.request.urlopen(request, timeout=60) as r:
        return json.loads(r.read())


def test_orthanc_pushes_a_study_and_the_sr_and_summary_appear_in_the_same_study(
        tmp_path: Path, shared_dicom: Path, demo_bundle: Path, orthanc: tuple[str, int, int],
        daemons: list[DaemonProcess]) -> None:
    base, orthanc_port, port = orthanc
    extra = (f'[[destinations]]\nname = "orthanc"\nhost = "127.0.0.1"\nport = {orthanc_port}\n'
             'called_ae = "ORTHANC"\ncalling_ae = "OPACITYD"\n'
             '[delivery]\npoll_interval_s = 0.2\n[worker]\npoll_interval_s = 0.2\n')
    cfg = write_config(tmp_path / "d", extra, port=port, bundle=demo_bundle)
    daemons.append(DaemonProcess(cfg, tmp_path / "daemon.log", port).start())
    pa, _ = _study(shared_dicom, tmp_path / "in")
    uploaded = _rest(base, "/instances", pa.read_bytes())
    study_id = uploaded["ParentStudy"]  # type: ignore[index]
    _rest(base, "/modalities/opacityd/store", json.dumps(study_id).encode())

    def sr_series() -> list[dict[str, object]]:
        series = _rest(base, f"/studies/{study_id}/series")
        return [s for s in series if s["MainDicomTags"].get("Modality") == "SR"]  # type: ignore[union-attr,index]
    (series,) = wait_until(sr_series, timeout=120, interval=0.5, what="the SR in Orthanc's study")
    (instance_id,) = series["Instances"]  # type: ignore[misc]
    tags = _rest(base, f"/instances/{instance_id}/simplified-tags")
    assert tags["StudyInstanceUID"] == pydicom.dcmread(pa, stop_before_pixels=True).StudyInstanceUID  # type: ignore[index]
    assert "NOT FOR CLINICAL USE" in tags["SeriesDescription"]  # type: ignore[index]
    assert tags["Manufacturer"] == "opacityd"  # type: ignore[index]

    # The summary image: a Secondary Capture series of its own in the same study, which Orthanc
    # renders (its preview PNG is kept beside the test's files, and under $OPACITYD_SCREENSHOTS).
    def sc_series() -> list[dict[str, object]]:
        series = _rest(base, f"/studies/{study_id}/series")
        return [s for s in series if s["MainDicomTags"].get("Modality") == "OT"  # type: ignore[union-attr,index]
                or "opacityd" in str(s["MainDicomTags"].get("SeriesDescription", ""))  # type: ignore[union-attr,index]
                and s["MainDicomTags"].get("Modality") != "SR"]  # type: ignore[union-attr,index]
    (summary,) = wait_until(sc_series, timeout=120, interval=0.5, what="the summary in Orthanc")
    (summary_id,) = summary["Instances"]  # type: ignore[misc]
    tags = _rest(base, f"/instances/{summary_id}/simplified-tags")
    assert tags["SOPClassUID"] == "1.2.840.10008.5.1.4.1.1.7"  # type: ignore[index]
    assert tags["StudyInstanceUID"] == pydicom.dcmread(pa, stop_before_pixels=True).StudyInstanceUID  # type: ignore[index]
    assert tags["BurnedInAnnotation"] == "YES"  # type: ignore[index]
    assert "NOT FOR CLINICAL USE" in tags["SeriesDescription"]  # type: ignore[index]
    with urllib.request.urlopen(f"{base}/instances/{summary_id}/preview", timeout=60) as r:
        assert r.headers["Content-Type"] == "image/png"
        preview = r.read()
    kept = tmp_path / "orthanc-summary-preview.png"
    kept.write_bytes(preview)
    if os.environ.get("OPACITYD_SCREENSHOTS"):
        (Path(os.environ["OPACITYD_SCREENSHOTS"]) / kept.name).write_bytes(preview)
    rendered = np.asarray(Image.open(kept).convert("RGB"))
    assert rendered.shape[1] == 1024 and rendered.std() > 10  # the image itself, not a blank


def test_daemon_killed_with_a_delivery_outstanding_delivers_exactly_once_after_restart(
        tmp_path: Path, shared_dicom: Path, demo_bundle: Path, pacs: Pacs,
        daemons: list[DaemonProcess], database_url: str) -> None:
    daemon, cfg, engine, sessions = _one_study_in(tmp_path, shared_dicom, demo_bundle, pacs, daemons,
                                                  database_url)

    def attempted() -> bool:
        with unit_of_work(sessions) as s:
            attempts = s.scalars(sa.select(Delivery.attempts)).all()
            return len(attempts) == 2 and min(attempts) >= 1
    wait_until(attempted, timeout=120, what="an attempt of both deliveries while the PACS is down")
    daemon.kill9()  # the serve process dies with the SR undelivered; its worker is orphaned
    pacs.start()
    restarted = DaemonProcess(cfg, tmp_path / "daemon2.log", daemon.port).start()
    daemons.append(restarted)

    wait_until(lambda: _delivery(sessions, DeliveryState.DELIVERED), timeout=120,
               what="delivery after the restart")
    assert len(pacs.srs()) == 1 and len(pacs.summaries()) == 1
    with unit_of_work(sessions) as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(Result)) == 1
    engine.dispose()
    assert restarted.terminate() == 0

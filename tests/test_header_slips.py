"""Header slips real modalities make never leave a study without its report, and neither they
nor any error text put patient data into a log line, an audit row, the API or the CLI.

Real `opacityd serve` and `opacityd worker` processes, DCMTK storescu as the modality and
storescp as the PACS; the SR that arrives is checked with dciodvfy.
"""

from __future__ import annotations

import copy
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import sqlalchemy as sa
from pydicom import config as pydicom_config
from pydicom.uid import generate_uid

from db.models import AuditEvent
from db.states import AuditAction, JobState
from tests.conftest import OPACITYD, Pacs, free_port, wait_until
from tests.daemon_process import DaemonProcess
from tests.factories import SENTINEL_PHI, make_dx
from tests.test_report import _errors
from tests.test_worker_faults import _http, _separate_worker, _store
from tests.worker_process import WorkerProcess

NEEDLES = ("SENTINELNAME", "QUOKKA", "SENTINELPID4711", "1902-03-04", "19020304", "SENTACC0815",
           "SECONDNAME")


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[Pacs]:
    """storescp keeping a new file per receipt (+uf), so an SR received twice is seen twice."""
    p = Pacs(tmp_path / "pacs", free_port(), options=("+uf",)).start()
    yield p
    p.stop()


def _slipped() -> pydicom.Dataset:
    """A chest DX whose header has the slips of the issue, each carrying a sentinel."""
    ds = make_dx(96, 96, seed=11, phi=SENTINEL_PHI)
    before = pydicom_config.settings.writing_validation_mode
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
    try:
        ds.PatientName = [SENTINEL_PHI["PatientName"], "SECONDNAME^X"]
        ds.PatientBirthDate = "1902-03-04"
        ds.PatientSex = "MALE"
        ds.StudyTime = "12:30:05"
        ds.StudyDate = "2026-02-31"
        ds.AccessionNumber = SENTINEL_PHI["AccessionNumber"] + "TOOLONGFORSH"
        ds.SpecificCharacterSet = "ISO_IR 999"
    finally:
        pydicom_config.settings.writing_validation_mode = before
    return ds


def _blank_next_to(study: pydicom.Dataset) -> pydicom.Dataset:
    """A second frontal image of ``study`` (same header, slips included) whose pixels are all
    equal: refused, blank_image."""
    ds = copy.deepcopy(study)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PixelData = np.full((96, 96), 700, dtype=np.uint16).tobytes()
    return ds


def test_a_study_with_header_slips_gets_one_valid_sr_and_no_channel_shows_patient_data(
        tmp_path: Path, daemons: list[DaemonProcess], workers: list[WorkerProcess], pacs: Pacs,
        demo_bundle: Path, db_of: Any) -> None:
    daemon, cfg = _separate_worker(tmp_path, daemons, pacs, demo_bundle)
    db = db_of(cfg)
    slipped = _slipped()
    blank = _blank_next_to(slipped)
    plain = make_dx(96, 96, seed=13)
    _store(daemon.port, tmp_path / "in", [slipped, blank, plain])
    worker = WorkerProcess(cfg, tmp_path / "worker.log").start()
    workers.append(worker)
    wait_until(lambda: db.settled(2), timeout=180, what="both studies scored and delivered")

    jobs = db.jobs()
    assert {uid: state for uid, (state, *_) in jobs.items()} == {
        slipped.StudyInstanceUID: JobState.DONE, plain.StudyInstanceUID: JobState.DONE}
    srs = [p for p in pacs.folder.iterdir() if p.is_file()]
    by_study = {str(pydicom.dcmread(p).StudyInstanceUID): p for p in srs}
    assert len(srs) == 2 and set(by_study) == set(jobs)
    sr_path = by_study[slipped.StudyInstanceUID]
    assert _errors(sr_path) == []
    sr = pydicom.dcmread(sr_path)
    assert sr.PatientBirthDate == "19020304" and sr.PatientSex == "M"  # repaired, certain
    assert sr.StudyTime == "123005" and sr.PatientName == ""  # two names: dropped

    (repaired,) = db.query(sa.select(AuditEvent.detail).where(
        AuditEvent.action == AuditAction.HEADER_SANITISED,
        AuditEvent.study_uid == slipped.StudyInstanceUID))
    attributes = {r["attribute"] for r in json.loads(repaired[0])["repairs"]}
    assert attributes >= {"PatientName", "PatientBirthDate", "PatientSex", "StudyTime", "StudyDate",
                          "AccessionNumber", "SpecificCharacterSet"}
    (recorded,) = db.query(sa.select(AuditEvent.detail).where(
        AuditEvent.action == AuditAction.RESULT_RECORDED,
        AuditEvent.study_uid == slipped.StudyInstanceUID))
    assert json.loads(recorded[0])["refused"] == {blank.SOPInstanceUID: "blank_image"}

    status, body = _http(db.config, f"/api/v1/studies/{slipped.StudyInstanceUID}")
    assert status == 200
    study = json.loads(body)
    (result,) = study["results"]
    assert result["images"][blank.SOPInstanceUID] == {"refused": "blank_image"}
    assert "probability" in result["images"][slipped.SOPInstanceUID]

    cli = [subprocess.run([OPACITYD, "--config", str(cfg), *args], capture_output=True, text=True,
                          timeout=120)
           for args in (["audit", slipped.StudyInstanceUID], ["worklist", "--json"], ["status"],
                        ["studies"], ["deliveries", "--all"])]
    assert all(proc.returncode == 0 for proc in cli), [p.stderr for p in cli]
    audit_rows = db.query(sa.select(AuditEvent.actor, AuditEvent.detail))
    _, worklist = _http(db.config, "/api/v1/worklist")
    assert worker.terminate() == 0
    assert daemon.terminate() == 0
    channels = {
        "worker log": worker.log_path.read_text(errors="replace"),
        "serve log": daemon.output(),
        "audit rows": " ".join(f"{actor} {detail}" for actor, detail in audit_rows),
        "study API": body.decode(errors="replace"),
        "worklist API": worklist.decode(errors="replace"),
        "CLI": " ".join(p.stdout + p.stderr for p in cli),
    }
    leaked = {name: [n for n in NEEDLES if n in text] for name, text in channels.items()}
    assert leaked == {name: [] for name in channels}

"""Messy headers and damaged images (classes 2 to 4 of the hostile-input issue): header slips
real modalities make never leave a study without its report; neither they nor any error text
put patient data into a log line, an audit row, the API or the CLI; and each damaged image gets
its own reason or note, visible in the audit trail and the API.

Real `opacityd serve` and `opacityd worker` processes, DCMTK storescu as the modality and
storescp as the PACS; the SR that arrives is checked with dciodvfy. As for every hostile test,
a legitimate sender is served within a bound meanwhile, serve's RSS stays bounded, and serve
answers C-ECHO afterwards.
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
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, generate_uid
from pynetdicom import AE

from db.models import AuditEvent
from db.states import AuditAction, JobState
from tests.conftest import OPACITYD, Pacs, free_port, wait_until
from tests.daemon_process import DaemonProcess
from tests.factories import SENTINEL_PHI, make_dx
from tests.hostile.conftest import Target, store_seconds
from tests.test_report import _errors
from tests.test_worker_faults import _http, _separate_worker, _store
from tests.worker_process import WorkerProcess

LEGITIMATE_BOUND_S = 5.0
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
    ds = _beside(study)
    ds.PixelData = np.full((96, 96), 700, dtype=np.uint16).tobytes()
    return ds


def _beside(study: pydicom.Dataset) -> pydicom.Dataset:
    """Another image of ``study`` with the same header (slips included)."""
    ds = copy.deepcopy(study)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return ds


def _corrupt_jpeg2000_beside(study: pydicom.Dataset) -> pydicom.Dataset:
    """JPEG 2000 Lossless (a supported syntax) whose codestream is damaged: corrupt_pixel_data."""
    ds = _beside(study)
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(range(256)) * 4])
    return ds


def _high_bit_beside(study: pydicom.Dataset) -> pydicom.Dataset:
    """HighBit that disagrees with BitsStored: scored, with a note."""
    ds = _beside(study)
    ds.HighBit = int(ds.BitsStored) - 5
    return ds


def test_a_study_with_header_slips_gets_one_valid_sr_and_no_channel_shows_patient_data(
        tmp_path: Path, daemons: list[DaemonProcess], workers: list[WorkerProcess], pacs: Pacs,
        demo_bundle: Path, db_of: Any) -> None:
    daemon, cfg = _separate_worker(tmp_path, daemons, pacs, demo_bundle)
    db = db_of(cfg)
    slipped = _slipped()
    blank = _blank_next_to(slipped)
    jpeg2000 = _corrupt_jpeg2000_beside(slipped)
    high_bit = _high_bit_beside(slipped)
    plain = make_dx(96, 96, seed=13)
    with Target(daemon, cfg).under_attack():
        _store(daemon.port, tmp_path / "in", [slipped, blank, high_bit, plain])
        # DCMTK storescu proposes no JPEG 2000 context unless told to: pynetdicom sends it.
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(jpeg2000.SOPClassUID, JPEG2000Lossless)
        assoc = ae.associate("127.0.0.1", daemon.port, ae_title="OPACITYD")
        assert assoc.is_established
        assert assoc.send_c_store(jpeg2000).Status == 0x0000
        assoc.release()
        worker = WorkerProcess(cfg, tmp_path / "worker.log").start()
        workers.append(worker)
        assert store_seconds(daemon.port) < LEGITIMATE_BOUND_S  # a third study, legitimate
        wait_until(lambda: db.settled(3), timeout=180, what="every study scored and delivered")

    jobs = db.jobs()
    assert all(state == JobState.DONE for state, *_ in jobs.values()) and len(jobs) == 3
    srs = pacs.srs()
    by_study = {str(pydicom.dcmread(p).StudyInstanceUID): p for p in srs}
    assert len(srs) == 3 and set(by_study) == set(jobs)
    sr_path = by_study[slipped.StudyInstanceUID]
    assert _errors(sr_path) == []
    # The summary images are made from the same sanitised header: valid, and repaired alike.
    summaries = {str(pydicom.dcmread(p).StudyInstanceUID): p for p in pacs.summaries()}
    assert set(summaries) == set(jobs)
    assert _errors(summaries[slipped.StudyInstanceUID]) == []
    summary = pydicom.dcmread(summaries[slipped.StudyInstanceUID])
    assert summary.PatientBirthDate == "19020304" and summary.PatientName == ""
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
    per_image = json.loads(recorded[0])
    assert per_image["refused"] == {blank.SOPInstanceUID: "blank_image",
                                    jpeg2000.SOPInstanceUID: "corrupt_pixel_data"}
    assert per_image["notes"][high_bit.SOPInstanceUID][0].startswith("high_bit_inconsistent")

    status, body = _http(db.config, f"/api/v1/studies/{slipped.StudyInstanceUID}")
    assert status == 200
    study = json.loads(body)
    (result,) = study["results"]
    assert result["images"][blank.SOPInstanceUID] == {"refused": "blank_image"}
    assert result["images"][jpeg2000.SOPInstanceUID] == {"refused": "corrupt_pixel_data"}
    assert "probability" in result["images"][high_bit.SOPInstanceUID]
    assert result["images"][high_bit.SOPInstanceUID]["notes"][0].startswith("high_bit_inconsistent")
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

"""The Storage SCP against real peers on loopback: DCMTK storescu/echoscu and pynetdicom."""

from __future__ import annotations

import json
import sqlite3
from datetime import timedelta
from pathlib import Path

import pydicom
import pynetdicom
import pytest
import sqlalchemy as sa
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation, Verification

from daemon.scheduler import complete_studies
from db.models import AuditEvent, Instance, Job, Study
from db.states import AuditAction, JobState, StudyState
from tests.conftest import Harness, echoscu, running_receiver, storescu, wait_until
from tests.factories import make_dx, write_series


def _instances(h: Harness) -> list[Instance]:
    return h.query(lambda s: list(s.scalars(sa.select(Instance).order_by(Instance.id))))


def _jobs(h: Harness) -> list[Job]:
    return h.query(lambda s: list(s.scalars(sa.select(Job).order_by(Job.id))))


def _audit(h: Harness, action: AuditAction) -> list[AuditEvent]:
    return h.query(lambda s: list(s.scalars(sa.select(AuditEvent).where(AuditEvent.action == action))))


def _scu(port: int, contexts: list[str], aet: str = "PYNETDICOM"):  # type: ignore[no-untyped-def]
    ae = AE(ae_title=aet)
    for cx in contexts:
        ae.add_requested_context(cx)
    assoc = ae.associate("127.0.0.1", port, ae_title="OPACITYD")
    assert assoc.is_established
    return assoc


def test_echo_from_dcmtk_echoscu_succeeds(harness: Harness) -> None:
    proc = echoscu(harness.port)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Received Echo Response (Success)" in proc.stdout + proc.stderr


def test_study_over_one_association_is_fsynced_recorded_and_queued_exactly_once(
        harness: Harness, tmp_path: Path) -> None:
    files = write_series(tmp_path / "in", 6, 128, 96)
    proc, acks = storescu(harness.port, files)
    assert proc.returncode == 0, proc.stderr
    assert set(acks) == set(files) and set(acks.values()) == {"Success"}

    rows = _instances(harness)
    assert len(rows) == 6
    for path in files:
        original = pydicom.dcmread(path)
        row = next(r for r in rows if r.sop_instance_uid == original.SOPInstanceUID)
        stored = pydicom.dcmread(harness.spool.absolute(row.spool_path))
        assert stored.file_meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID
        assert stored.PixelData == original.PixelData
        assert row.eligible and row.eligibility_reason == "eligible"

    wait_until(lambda: _jobs(harness), what="study completion")
    assert complete_studies(harness.sessions, timedelta(seconds=0)) == 0
    jobs = _jobs(harness)
    assert [(j.state, j.study_revision) for j in jobs] == [(JobState.QUEUED, 1)]
    study = harness.query(lambda s: s.scalar(sa.select(Study)))
    assert study.state == StudyState.COMPLETE


def test_study_over_several_associations_is_one_study(harness: Harness, tmp_path: Path) -> None:
    study_uid = generate_uid()
    batches = [write_series(tmp_path / f"b{i}", 2, study_uid=study_uid, prefix=f"b{i}_")
               for i in range(3)]
    for files in batches:
        proc, acks = storescu(harness.port, files)
        assert set(acks.values()) == {"Success"}, proc.stderr
    assert len(_instances(harness)) == 6
    assert harness.query(lambda s: s.scalar(sa.select(sa.func.count()).select_from(Study))) == 1
    wait_until(lambda: _jobs(harness), what="study completion")
    assert len(_jobs(harness)) == 1


def test_resent_instance_is_acknowledged_stored_once_and_audited(harness: Harness,
                                                                  tmp_path: Path) -> None:
    files = write_series(tmp_path / "in", 1)
    for _ in range(3):
        _, acks = storescu(harness.port, files)
        assert acks == {files[0]: "Success"}
    rows = _instances(harness)
    assert len(rows) == 1 and rows[0].receive_count == 3
    assert len(_audit(harness, AuditAction.INSTANCE_DUPLICATE)) == 2
    assert len(list(harness.spool.root.rglob("*.dcm"))) == 1


@pytest.mark.parametrize(("name", "flag"), [
    ("derived/DERIVED_nihgcp_rle.dcm", "-xr"),
    ("derived/DERIVED_nihgcp_j2k-lossless.dcm", "-xv"),
    ("derived/DERIVED_fuji-cr-mono1-10_j2k-lossless.dcm", "-xv"),
    ("derived/DERIVED_nihgcp_deflated.dcm", "-xd"),
    ("siimacr_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm", "-xy"),
    ("orthanc_Issue44_Monochrome1-Jpeg.dcm", "-xy"),
    ("fodicom_CR-MONO1-10-chest.dcm", "-xi"),
])
def test_real_files_in_their_transfer_syntax_are_stored_byte_for_byte(
        harness: Harness, shared_dicom: Path, name: str, flag: str) -> None:
    path = shared_dicom / name
    proc, acks = storescu(harness.port, [path], flag)
    assert acks == {path: "Success"}, proc.stdout + proc.stderr
    original = pydicom.dcmread(path, force=True)
    (row,) = _instances(harness)
    stored = pydicom.dcmread(harness.spool.absolute(row.spool_path))
    if original.file_meta.get("TransferSyntaxUID"):
        assert stored.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert row.transfer_syntax_uid == stored.file_meta.TransferSyntaxUID
    assert stored.PixelData == original.PixelData


def test_large_16bit_image_is_stored_intact(harness: Harness, tmp_path: Path) -> None:
    ds = make_dx(2500, 2048, seed=7)
    path = tmp_path / "large.dcm"
    ds.save_as(path, enforce_file_format=True)
    _, acks = storescu(harness.port, [path])
    assert acks == {path: "Success"}
    (row,) = _instances(harness)
    assert row.size_bytes > 2500 * 2048 * 2
    assert pydicom.dcmread(harness.spool.absolute(row.spool_path)).PixelData == ds.PixelData


def test_unknown_calling_ae_is_rejected_with_reason_3(tmp_path: Path) -> None:
    extra = '[[receiver.peers]]\nae_title = "MODALITY"\naddresses = []\n'
    with running_receiver(tmp_path, extra) as h:
        assert echoscu(h.port, aet="MODALITY").returncode == 0
        proc = echoscu(h.port, aet="STRANGER")
        assert proc.returncode != 0
        out = proc.stdout + proc.stderr
        assert "Rejected Permanent" in out and "Calling AE Title Not Recognized" in out
        (event,) = _audit(h, AuditAction.ASSOCIATION_REJECTED)
        assert event.actor == "STRANGER"
        assert json.loads(event.detail)["reason"] == "calling_ae_not_recognized"


def test_known_ae_from_an_address_not_listed_is_rejected(tmp_path: Path) -> None:
    extra = '[[receiver.peers]]\nae_title = "MODALITY"\naddresses = ["10.0.0.0/8"]\n'
    with running_receiver(tmp_path, extra) as h:
        proc = echoscu(h.port, aet="MODALITY")
        assert proc.returncode != 0
        assert "Reason: No Reason" in proc.stdout + proc.stderr
        (event,) = _audit(h, AuditAction.ASSOCIATION_REJECTED)
        assert json.loads(event.detail)["reason"] == "address_not_allowed"


def test_wrong_called_ae_is_rejected_with_reason_7(harness: Harness) -> None:
    proc = echoscu(harness.port, aec="NOTUS")
    assert proc.returncode != 0
    assert "Called AE Title Not Recognized" in proc.stdout + proc.stderr


def test_association_limit_rejects_transiently(tmp_path: Path) -> None:
    with running_receiver(tmp_path, "max_associations = 1") as h:
        first = _scu(h.port, [Verification])
        try:
            proc = echoscu(h.port)
            assert proc.returncode != 0
            assert "Local Limit Exceeded" in proc.stdout + proc.stderr
        finally:
            first.release()
        wait_until(lambda: echoscu(h.port).returncode == 0, what="slot freed")


def test_unsupported_presentation_context_is_refused_and_others_still_work(harness: Harness) -> None:
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(DigitalXRayImageStorageForPresentation)
    assoc = ae.associate("127.0.0.1", harness.port, ae_title="OPACITYD")
    assert assoc.is_established
    try:
        refused = [cx for cx in assoc.rejected_contexts if cx.abstract_syntax == CTImageStorage]
        assert refused and refused[0].result == 0x03  # abstract syntax not supported
        ct = make_dx(sop_class=CTImageStorage, modality="CT")
        with pytest.raises(ValueError, match="presentation context"):
            assoc.send_c_store(ct)
        status = assoc.send_c_store(make_dx())
        assert status.Status == 0x0000
    finally:
        assoc.release()
    assert len(_instances(harness)) == 1


def _raw_file(tmp_path: Path, body: bytes, transfer_syntax: str) -> Path:
    """A file with a valid preamble and file meta but an arbitrary data set body."""
    ds = make_dx()
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    tmp_path.mkdir(parents=True, exist_ok=True)
    good = tmp_path / "good.dcm"
    ds.save_as(good, enforce_file_format=True)
    with good.open("rb") as fh:
        pydicom.filereader.read_preamble(fh, False)
        pydicom.filereader._read_file_meta_info(fh)
        meta_end = fh.tell()
    path = tmp_path / "raw.dcm"
    path.write_bytes(good.read_bytes()[:meta_end] + body)
    return path


def test_malformed_and_unidentified_datasets_get_0xC_statuses_and_the_association_goes_on(
        harness: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Send files' bytes as they are, so the receiver sees exactly what is on disk.
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)
    not_zlib = _raw_file(tmp_path / "z", b"this is not a deflate stream" * 8,
                         DeflatedExplicitVRLittleEndian)
    sop_class = DigitalXRayImageStorageForPresentation.encode() + b"\x00"
    sop_uid = b"1.2.3.4.5.6"
    truncated = _raw_file(tmp_path / "t", (
        b"\x08\x00\x16\x00UI" + len(sop_class).to_bytes(2, "little") + sop_class
        + b"\x08\x00\x18\x00UI" + len(sop_uid).to_bytes(2, "little") + sop_uid
        # Study Instance UID claims 0x7000 bytes; the stream ends 12 bytes later.
        + b"\x20\x00\x0d\x00UI\x00\x70" + b"1.2.3.4.5.6."), ExplicitVRLittleEndian)
    no_study = make_dx()
    del no_study.StudyInstanceUID
    bad_uid = make_dx()
    bad_uid.SeriesInstanceUID = "1.2.abc.3"
    ae = AE(ae_title="PYNETDICOM")
    for syntax in (ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
        ae.add_requested_context(DigitalXRayImageStorageForPresentation, syntax)
    assoc = ae.associate("127.0.0.1", harness.port, ae_title="OPACITYD")
    assert assoc.is_established
    try:
        malformed = assoc.send_c_store(not_zlib)
        cut_short = assoc.send_c_store(truncated)
        missing = assoc.send_c_store(no_study)
        invalid = assoc.send_c_store(bad_uid)
        ok = assoc.send_c_store(make_dx())
    finally:
        assoc.release()
    assert malformed.Status == 0xC000 and "cannot parse data set" in malformed.ErrorComment
    assert cut_short.Status == 0xC001 and cut_short.ErrorComment == "missing SeriesInstanceUID"
    assert missing.Status == 0xC001 and missing.ErrorComment == "missing StudyInstanceUID"
    assert invalid.Status == 0xC002 and invalid.ErrorComment == "invalid SeriesInstanceUID"
    assert ok.Status == 0x0000
    assert len(_instances(harness)) == 1
    reasons = sorted(json.loads(e.detail)["reason"]
                     for e in _audit(harness, AuditAction.INSTANCE_REFUSED))
    assert reasons == ["invalid_uid", "malformed_dataset", "missing_uid", "missing_uid"]


def test_lateral_and_non_chest_are_recorded_ineligible(harness: Harness, tmp_path: Path) -> None:
    study = generate_uid()
    pa = make_dx(study_uid=study, view="PA")
    lateral = make_dx(study_uid=study, view="LL")
    knee = make_dx(study_uid=study, body_part="KNEE")
    assoc = _scu(harness.port, [DigitalXRayImageStorageForPresentation])
    try:
        assert all(assoc.send_c_store(ds).Status == 0 for ds in (pa, lateral, knee))
    finally:
        assoc.release()
    reasons = {r.sop_instance_uid: (r.eligible, r.eligibility_reason) for r in _instances(harness)}
    assert reasons == {pa.SOPInstanceUID: (True, "eligible"),
                       lateral.SOPInstanceUID: (False, "lateral_view"),
                       knee.SOPInstanceUID: (False, "not_chest")}


def test_discard_policy_keeps_the_row_but_not_the_pixels(tmp_path: Path) -> None:
    with running_receiver(tmp_path, 'ineligible_instances = "discard"') as h:
        assoc = _scu(h.port, [DigitalXRayImageStorageForPresentation])
        try:
            assert assoc.send_c_store(make_dx(view="LL")).Status == 0
        finally:
            assoc.release()
        (row,) = _instances(h)
        assert row.spool_path is None and row.eligibility_reason == "lateral_view"
        assert not list(h.spool.root.rglob("*.dcm"))
        wait_until(lambda: h.query(lambda s: s.scalar(sa.select(Study.state))) == StudyState.IGNORED,
                   what="study ignored")
        assert _jobs(h) == []


def test_late_instance_reopens_the_study_and_enqueues_a_new_revision(harness: Harness) -> None:
    study = generate_uid()
    assoc = _scu(harness.port, [DigitalXRayImageStorageForPresentation])
    try:
        assert assoc.send_c_store(make_dx(study_uid=study)).Status == 0
    finally:
        assoc.release()
    wait_until(lambda: len(_jobs(harness)) == 1, what="first completion")
    assoc = _scu(harness.port, [DigitalXRayImageStorageForPresentation])
    try:
        assert assoc.send_c_store(make_dx(study_uid=study, seed=3)).Status == 0
    finally:
        assoc.release()
    wait_until(lambda: len(_jobs(harness)) == 2, what="second completion")
    jobs = _jobs(harness)
    assert [(j.study_revision, j.state) for j in jobs] == [(1, JobState.SUPERSEDED),
                                                          (2, JobState.QUEUED)]
    assert len(_audit(harness, AuditAction.STUDY_REOPENED)) == 1


def test_database_failure_answers_0xA700_and_leaves_no_file_and_no_row(tmp_path: Path) -> None:
    with running_receiver(tmp_path, "[database]\nbusy_timeout_ms = 200") as h:
        db_path = h.config.database_url.removeprefix("sqlite:///")
        blocker = sqlite3.connect(db_path, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        assoc = _scu(h.port, [DigitalXRayImageStorageForPresentation])
        try:
            refused = assoc.send_c_store(make_dx())
            blocker.execute("ROLLBACK")
            accepted = assoc.send_c_store(make_dx())
        finally:
            assoc.release()
            blocker.close()
        assert refused.Status == 0xA700 and "database" in refused.ErrorComment
        assert accepted.Status == 0x0000
        assert len(_instances(h)) == 1
        assert len(list(h.spool.root.rglob("*.dcm"))) == 1
        assert not list(h.spool.root.rglob("*.partial"))


def test_request_sop_instance_uid_differing_from_the_data_set_is_refused_0xA900(
        harness: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Chunked sending takes the request's Affected SOP Instance UID from the file meta.
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)
    ds = make_dx()
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.10.999.1"
    path = tmp_path / "mismatch.dcm"
    ds.preamble = b"\x00" * 128  # written with the file meta as it is (not made to match)
    ds.save_as(path, enforce_file_format=False)
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", harness.port, ae_title="OPACITYD")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(path)
        ok = assoc.send_c_store(make_dx())
    finally:
        assoc.release()
    assert status.Status == 0xA900 and "SOP Instance UID differs" in status.ErrorComment
    assert ok.Status == 0x0000
    assert len(_instances(harness)) == 1
    (refused,) = _audit(harness, AuditAction.INSTANCE_REFUSED)
    assert json.loads(refused.detail)["reason"] == "sop_instance_mismatch"

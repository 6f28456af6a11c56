"""The summary image: its DICOM object, its pixels and text, and how the worker makes, records,
supersedes and withholds it (real headers, a real SQLite file, the demo bundle, dciodvfy)."""

from __future__ import annotations

import dataclasses
import io
import json
import subprocess
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pydicom
import pytest
import sqlalchemy as sa
from PIL import Image

from daemon.config import load_config
from daemon.dicom.sanitize import sanitized
from daemon.results.summary import (
    SECONDARY_CAPTURE,
    SummaryInput,
    build_summary,
    series_description,
    text_lines,
)
from daemon.scheduler import complete_studies
from daemon.worker import Worker
from db.models import Delivery, Job, Result, Study
from db.states import DeliveryKind, JobState
from model.gradcam import GradCam
from model.manifest import NOT_FOR_CLINICAL_USE
from model.predictor import Predictor
from tests.conftest import Harness, require, running_receiver
from tests.factories import make_dx

SIIM = "siimacr_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
WHEN = datetime(2026, 12, 3, 16, 0)
DESTINATIONS = ('[[destinations]]\nname = "pacs"\nhost = "127.0.0.1"\nport = 11112\n'
                'called_ae = "PACS"\n'
                '[[destinations]]\nname = "archive"\nhost = "127.0.0.1"\nport = 11113\n'
                'called_ae = "ARCHIVE"\nsend = ["sr"]\n')


@pytest.fixture(scope="module")
def predictor(demo_bundle: Path) -> Predictor:
    return Predictor(demo_bundle)


def _dciodvfy_errors(ds: pydicom.Dataset, folder: Path) -> list[str]:
    require("/usr/bin/dciodvfy")
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    out = subprocess.run(["/usr/bin/dciodvfy", str(path)], capture_output=True, text=True)
    return [line for line in out.stderr.splitlines() if line.startswith("Error")]


def _item(predictor: Predictor, source: pydicom.Dataset, probability: float | None,
          **kwargs: object) -> SummaryInput:
    rng = np.random.default_rng(1)
    shown = probability is not None
    fields: dict[str, object] = {
        "study_uid": str(source.StudyInstanceUID), "revision": 1, "key": "k" * 64,
        "manifest": predictor.manifest, "probability": probability, "source": source,
        "network_input": rng.random((71, 71)) if shown else None,
        "heatmap": rng.random((71, 71)) if shown else None,
        "scored_images": 1 if shown else 0,
        "refusals": [] if shown else ["corrupt_pixel_data", "too_large", "too_large"]}
    fields.update(kwargs)
    return SummaryInput(**fields)  # type: ignore[arg-type]


def test_summary_is_a_valid_secondary_capture_filed_in_the_source_study(
        tmp_path: Path, shared_dicom: Path, predictor: Predictor) -> None:
    original = pydicom.dcmread(shared_dicom / SIIM)
    source = sanitized(original).dataset
    for probability in (0.93, None):
        sc = build_summary(_item(predictor, source, probability), WHEN)
        assert _dciodvfy_errors(sc, tmp_path) == []
        assert sc.SOPClassUID == SECONDARY_CAPTURE
        assert (sc.StudyInstanceUID, sc.PatientID) == (original.StudyInstanceUID, original.PatientID)
        assert list(sc.ImageType) == ["DERIVED", "SECONDARY"] and sc.BurnedInAnnotation == "YES"
        assert sc.Manufacturer == "opacityd" and sc.SoftwareVersions == predictor.manifest.version
        assert sc.SeriesDescription.startswith("opacityd opacity-xception")
        assert sc.SeriesDescription.endswith(NOT_FOR_CLINICAL_USE)  # the demo bundle: not validated
        assert sc.PhotometricInterpretation == "RGB" and sc.pixel_array.shape[1] == 1024
        assert sc.pixel_array.std() > 10
    scored = build_summary(_item(predictor, source, 0.93), WHEN)
    assert scored.SourceImageSequence[0].ReferencedSOPInstanceUID == original.SOPInstanceUID
    not_analysable = build_summary(_item(predictor, source, None), WHEN)
    assert "SourceImageSequence" not in not_analysable  # no image shown
    assert not_analysable.Rows < scored.Rows  # the text band only


def test_burned_in_text_names_result_model_and_date_never_the_patient(
        shared_dicom: Path, predictor: Predictor) -> None:
    source = sanitized(pydicom.dcmread(shared_dicom / SIIM)).dataset
    manifest = predictor.manifest
    scored = " | ".join(t for t, _ in text_lines(_item(predictor, source, 0.93), WHEN))
    assert "Priority: URGENT" in scored and "Probability: 0.930" in scored
    assert "opacity PRESENT" in scored and NOT_FOR_CLINICAL_USE in scored
    assert f"{manifest.name} {manifest.version}" in scored and "2026-12-03 16:00" in scored
    assert "Grad-CAM" in scored
    without = " | ".join(t for t, _ in text_lines(
        _item(predictor, source, 0.2, heatmap=None, heatmap_problem="Grad-CAM failed (MemoryError)"),
        WHEN))
    assert "Priority: ROUTINE" in without and "opacity absent" in without
    assert "No heatmap (Grad-CAM failed (MemoryError))" in without
    refused = " | ".join(t for t, _ in text_lines(_item(predictor, source, None), WHEN))
    assert "NOT ANALYSABLE" in refused
    assert "1 image: Corrupt pixel data" in refused and "2 images: Image too large" in refused
    for text in (scored, without, refused):
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber"):
            value = str(source.get(keyword, "") or "")
            assert not value or value not in text
    validated = dataclasses.replace(manifest, validated=True)
    text = " | ".join(t for t, _ in text_lines(_item(predictor, source, 0.93, manifest=validated), WHEN))
    assert NOT_FOR_CLINICAL_USE not in text
    assert series_description(validated) == f"opacityd {manifest.name} {manifest.version}"


def test_uids_are_deterministic_and_a_successor_joins_the_series(
        shared_dicom: Path, predictor: Predictor) -> None:
    source = sanitized(pydicom.dcmread(shared_dicom / SIIM)).dataset
    first = build_summary(_item(predictor, source, 0.5), WHEN)
    again = build_summary(_item(predictor, source, 0.5), WHEN + timedelta(hours=1))
    assert first.SOPInstanceUID == again.SOPInstanceUID
    later = build_summary(_item(predictor, source, 0.7, key="l" * 64, revision=2,
                                previous_uid=str(first.SOPInstanceUID)), WHEN)
    assert later.SOPInstanceUID != first.SOPInstanceUID
    assert later.SeriesInstanceUID == first.SeriesInstanceUID and later.InstanceNumber == 2
    assert f"supersedes {first.SOPInstanceUID}" in later.DerivationDescription


# The worker: what it makes, records and queues.



def _score(h: Harness, predictor: Predictor, **summary: object) -> Worker:
    complete_studies(h.sessions, timedelta(seconds=0))
    config = load_config(h.config.source, env={})
    if summary:
        config = dataclasses.replace(config, summary=dataclasses.replace(config.summary, **summary))
    worker = Worker(config, h.sessions, predictor, h.spool, owner="w")
    while worker.run_once():
        pass
    return worker


def _results(h: Harness) -> list[Result]:
    return list(h.query(lambda s: list(s.scalars(sa.select(Result).order_by(Result.id)))))


def _summary_detail(result: Result) -> dict[str, str | None]:
    detail: dict[str, str | None] = json.loads(result.detail)["summary"]
    return detail


def test_worker_makes_the_summary_and_previews_and_queues_it_where_send_lists_it(
        tmp_path: Path, predictor: Predictor) -> None:
    with running_receiver(tmp_path, DESTINATIONS, quiet_s=600) as h:
        pa = make_dx(96, 96)
        h.store(pa)
        _score(h, predictor)
        (result,) = _results(h)
        sc = pydicom.dcmread(h.spool.absolute(result.summary_path or ""))
        assert sc.SOPInstanceUID == result.summary_sop_instance_uid
        assert sc.StudyInstanceUID == pa.StudyInstanceUID
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == pa.SOPInstanceUID
        assert _dciodvfy_errors(sc, tmp_path) == []
        detail = _summary_detail(result)
        assert detail["image"] == pa.SOPInstanceUID and detail["reason"] is None
        for name in ("input_png", "heatmap_png"):
            png = Image.open(io.BytesIO(h.spool.absolute(detail[name] or "").read_bytes()))
            assert png.format == "PNG" and png.height == predictor.manifest.input_size
        kinds = h.query(lambda s: sorted((d.destination, d.kind.value)
                                         for d in s.scalars(sa.select(Delivery))))
        assert kinds == [("archive", "sr"), ("pacs", "sr"), ("pacs", "summary")]


def test_a_later_result_supersedes_the_summary_in_the_same_series(tmp_path: Path,
                                                                  predictor: Predictor) -> None:
    with running_receiver(tmp_path, quiet_s=600) as h:
        pa = make_dx(96, 96)
        h.store(pa)
        _score(h, predictor)
        h.store(make_dx(96, 96, study_uid=pa.StudyInstanceUID, seed=6))  # a late frontal
        _score(h, predictor)
        first, second = _results(h)
        assert first.summary_sop_instance_uid and second.summary_sop_instance_uid
        assert first.summary_sop_instance_uid != second.summary_sop_instance_uid
        old, new = (pydicom.dcmread(h.spool.absolute(r.summary_path or "")) for r in (first, second))
        assert new.SeriesInstanceUID == old.SeriesInstanceUID
        assert (old.InstanceNumber, new.InstanceNumber) == (1, 2)
        assert f"supersedes {old.SOPInstanceUID}" in new.DerivationDescription


def test_summaries_off_make_none_and_say_why(tmp_path: Path, predictor: Predictor) -> None:
    with running_receiver(tmp_path, DESTINATIONS, quiet_s=600) as h:
        h.store(make_dx(96, 96))
        _score(h, predictor, enabled=False)
        (result,) = _results(h)
        assert result.summary_path is None and result.summary_sop_instance_uid is None
        assert _summary_detail(result)["reason"] == "summary images are off (summary.enabled = false)"
        kinds = h.query(lambda s: {d.kind for d in s.scalars(sa.select(Delivery))})
        assert kinds == {DeliveryKind.SR}


def test_a_failing_heatmap_or_summary_never_holds_back_the_sr(tmp_path: Path,
                                                              predictor: Predictor) -> None:
    with running_receiver(tmp_path, DESTINATIONS, quiet_s=600) as h:
        # Grad-CAM raises (as it would out of memory): the summary is made without a heatmap.
        h.store(make_dx(96, 96))
        complete_studies(h.sessions, timedelta(seconds=0))
        worker = Worker(load_config(h.config.source, env={}), h.sessions, predictor, h.spool, "w")
        explainer = worker.explainer()
        assert isinstance(explainer, GradCam)

        def out_of_memory(activations: np.ndarray, size: tuple[int, int]) -> np.ndarray:
            raise MemoryError("injected")
        explainer.from_activations = out_of_memory  # type: ignore[method-assign]
        worker.run_once()
        (result,) = _results(h)
        detail = _summary_detail(result)
        assert detail["reason"] == "Grad-CAM failed (MemoryError)"
        assert result.summary_path and detail["input_png"] and detail["heatmap_png"] is None
        written = pydicom.dcmread(h.spool.absolute(result.summary_path))
        assert written.DerivationDescription == "opacityd summary: network input without heatmap"
        assert "SourceImageSequence" in written  # the image is shown, without a heatmap
        # The summary folder cannot be written: the SR is recorded and queued, no summary is.
        (h.spool.root / "summary").rename(h.spool.root / "summary-moved")
        (h.spool.root / "summary").write_text("not a folder")
        h.store(make_dx(96, 96, seed=3))
        _score(h, predictor)
        _, second = _results(h)
        assert second.summary_path is None
        reason = _summary_detail(second)["reason"] or ""
        assert reason.startswith("the summary image could not be made (")
        kinds = h.query(lambda s: sorted((d.destination, d.kind.value) for d in s.scalars(
            sa.select(Delivery).where(Delivery.result_id == second.id))))
        assert kinds == [("archive", "sr"), ("pacs", "sr")]
        assert h.query(lambda s: s.scalar(sa.select(Job.state).where(Job.id == second.job_id))) \
            == JobState.DONE


def test_odd_images_give_a_readable_summary_or_a_recorded_reason(tmp_path: Path,
                                                                 predictor: Predictor) -> None:
    """One-pixel-wide, too large, very thin, big, MONOCHROME1 and laterals-only studies, scored in
    one batch: each study ends with a result whose summary exists or says why; no job fails."""
    with running_receiver(tmp_path, quiet_s=600) as h:
        studies = {
            "one_pixel_wide": [make_dx(512, 1)],
            "too_large": [make_dx(2, 8193)],
            "thin": [make_dx(2, 3000)],
            "big": [make_dx(2500, 2048, seed=2)],
            "monochrome1": [make_dx(128, 128, photometric="MONOCHROME1")],
            "lateral_only": [make_dx(96, 96, view="LL")],
        }
        for datasets in studies.values():
            h.store(*datasets)
        _score(h, predictor)
        assert h.query(lambda s: s.scalar(sa.select(sa.func.count()).select_from(Job)
                                          .where(Job.state != JobState.DONE))) == 0
        by_study: dict[str, Result] = dict(h.query(lambda s: s.execute(
            sa.select(Study.study_uid, Result).join(Result, Result.study_id == Study.id)).all()))
        for name, datasets in studies.items():
            result = by_study.get(str(datasets[0].StudyInstanceUID))
            if name == "lateral_only":
                assert result is None  # never eligible: no job, no result, nothing to summarise
                continue
            assert result is not None, name
            detail = _summary_detail(result)
            assert result.summary_path, (name, detail)
            sc = pydicom.dcmread(h.spool.absolute(result.summary_path))
            assert sc.pixel_array.std() > 5, name
            if name in ("one_pixel_wide", "too_large"):
                assert result.priority == "not_analysable", name
                assert detail["reason"] == "not analysable: no image was scored, so no heatmap"
                assert detail["input_png"] is None
            else:
                assert result.probability is not None and detail["heatmap_png"], name


def test_migration_0006_keeps_existing_results_and_goes_back(database_url: str) -> None:
    """A database at 0005 with a result and its delivery: upgraded, the result has no summary;
    a summary delivery can be added; downgraded to 0005, the summary deliveries go and the rest
    stays; upgraded again."""
    from alembic import command

    from db import migrate
    from db.engine import create_db_engine

    engine = create_db_engine(database_url)
    cfg = migrate._alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0005")
    t = {"t": datetime(2026, 12, 1, 12, 0)}
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO studies (id, study_uid, state, revision, first_received_at,"
                             " last_received_at) VALUES (1, '1.2.3', 'complete', 1, :t, :t)"), t)
        conn.execute(sa.text("INSERT INTO jobs (id, study_id, study_revision, state, created_at,"
                             " updated_at, attempts) VALUES (1, 1, 1, 'done', :t, :t, 1)"), t)
        conn.execute(sa.text(
            "INSERT INTO results (id, job_id, study_id, study_revision, model_name, model_version,"
            " model_validated, threshold, priority, sr_sop_instance_uid, sr_series_uid, sr_path,"
            " detail, created_at) VALUES (1, 1, 1, 1, 'm', '1', false, 0.5, 'routine', '2.25.1',"
            " '2.25.2', 'sr/x.dcm', '{}', :t)"), t)
        conn.execute(sa.text("INSERT INTO deliveries (result_id, destination, kind, state, attempts,"
                             " next_attempt_at, created_at) VALUES (1, 'pacs', 'sr', 'delivered', 1,"
                             " :t, :t)"), t)
    assert migrate.upgrade(engine) == ("0005", migrate.head_revision())
    with engine.begin() as conn:
        assert conn.execute(sa.text("SELECT summary_path FROM results")).scalar() is None
        conn.execute(sa.text("UPDATE results SET summary_sop_instance_uid = '2.25.3', "
                             "summary_path = 'summary/x.dcm'"))
        conn.execute(sa.text("INSERT INTO deliveries (result_id, destination, kind, state, attempts,"
                             " next_attempt_at, created_at) VALUES (1, 'pacs', 'summary', 'pending',"
                             " 0, :t, :t)"), t)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0005")
    with engine.begin() as conn:
        assert conn.execute(sa.text("SELECT kind FROM deliveries")).scalars().all() == ["sr"]
        assert "summary_path" not in {c["name"] for c in sa.inspect(conn).get_columns("results")}
    assert migrate.upgrade(engine) == ("0005", migrate.head_revision())
    engine.dispose()

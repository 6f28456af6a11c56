"""The Structured Report: valid per dciodvfy, readable by pydicom, rendered by DCMTK dsrdump."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom

from daemon.report import ImageOutcome, build_sr, sr_instance_uid
from model.manifest import read_manifest
from tests.conftest import require
from tests.factories import make_dx

FUJI = "fodicom_CR-MONO1-10-chest.dcm"


def _errors(path: Path) -> list[str]:
    require("/usr/bin/dciodvfy")
    proc = subprocess.run(["/usr/bin/dciodvfy", str(path)], capture_output=True, text=True)
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]


def test_sr_for_pa_and_lateral_is_valid_and_carries_the_result(shared_dicom: Path, demo_bundle: Path,
                                                               tmp_path: Path) -> None:
    manifest = read_manifest(demo_bundle)
    pa = pydicom.dcmread(shared_dicom / FUJI, stop_before_pixels=True, force=True)
    lateral = make_dx(study_uid=pa.StudyInstanceUID, view="LL")
    sr = build_sr(pa.StudyInstanceUID, [ImageOutcome(pa, 0.93), ImageOutcome(lateral, None,
                                                                             "lateral_view")],
                  manifest)
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert _errors(path) == []
    back = pydicom.dcmread(path)
    assert back.StudyInstanceUID == pa.StudyInstanceUID
    assert back.Manufacturer == "opacityd"
    assert "NOT FOR CLINICAL USE" in back.SeriesDescription
    assert back.SOPInstanceUID == sr_instance_uid(pa.StudyInstanceUID, [pa.SOPInstanceUID], manifest)
    rendered = subprocess.run(["/usr/bin/dsrdump", str(path)], capture_output=True, text=True).stdout
    assert '"Probability of lung opacity")="0.93"' in rendered
    assert '(52101004,SCT,"Present")' in rendered
    assert "(PRI-URGENT,99OPACITYD" in rendered
    assert "(RSN-LATERAL_VIEW,99OPACITYD" in rendered
    assert manifest.name[:20] in rendered and "NOT FOR CLINICAL USE" in rendered


def test_not_analysable_study_and_superseding_sr_are_valid(demo_bundle: Path, tmp_path: Path) -> None:
    manifest = read_manifest(demo_bundle)
    first_image = make_dx()
    first = build_sr(first_image.StudyInstanceUID, [ImageOutcome(first_image, None, "blank_image")],
                     manifest)
    late = make_dx(study_uid=first_image.StudyInstanceUID, seed=2)
    second = build_sr(first_image.StudyInstanceUID, [ImageOutcome(first_image, None, "blank_image"),
                                                     ImageOutcome(late, 0.1)],
                      manifest, revision=2, previous=first)
    for name, sr in (("first", first), ("second", second)):
        path = tmp_path / f"{name}.dcm"
        sr.save_as(path, enforce_file_format=True)
        assert _errors(path) == [], name
    assert second.SeriesInstanceUID == first.SeriesInstanceUID
    assert second.SOPInstanceUID != first.SOPInstanceUID
    predecessor = second.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
    assert predecessor.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID


def test_sr_uid_is_deterministic(demo_bundle: Path) -> None:
    manifest = read_manifest(demo_bundle)
    assert sr_instance_uid("1.2.3", ["1.2.3.4", "1.2.3.5"], manifest) == sr_instance_uid(
        "1.2.3", ["1.2.3.5", "1.2.3.4"], manifest)
    assert sr_instance_uid("1.2.3", ["1.2.3.4"], manifest) != sr_instance_uid(
        "1.2.3", ["1.2.3.4", "1.2.3.5"], manifest)

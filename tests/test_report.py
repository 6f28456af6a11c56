"""The Structured Report: valid per dciodvfy, readable by pydicom, rendered by DCMTK dsrdump."""

from __future__ import annotations

import dataclasses
import subprocess
from datetime import datetime
from pathlib import Path

import pydicom
import pytest
from pydicom.filebase import DicomBytesIO

from daemon.results.report import (
    REASON_CODES,
    ImageOutcome,
    build_sr,
    reason_code,
    result_key,
    sr_instance_uid,
)
from model.errors import Refusal
from model.manifest import Manifest, read_manifest
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
    key = result_key(pa.StudyInstanceUID, 1, [ImageOutcome(pa, 0.93),
                                              ImageOutcome(lateral, None, "lateral_view")], manifest)
    assert back.SOPInstanceUID == sr_instance_uid(key, None)
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


def _bytes(sr: pydicom.Dataset) -> bytes:
    buffer = DicomBytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_the_same_content_gives_the_same_uid_and_with_the_same_time_the_same_bytes(
        demo_bundle: Path) -> None:
    manifest = read_manifest(demo_bundle)
    a = make_dx()
    b = make_dx(study_uid=a.StudyInstanceUID, seed=2)
    created = datetime(2026, 1, 2, 3, 4, 5, 678000)
    one = build_sr(a.StudyInstanceUID, [ImageOutcome(a, 0.25, None, "h-a"),
                                        ImageOutcome(b, None, "blank_image", "h-b")],
                   manifest, created=created)
    # Another arrival order and a probability that differs beyond the digits written.
    two = build_sr(a.StudyInstanceUID, [ImageOutcome(b, None, "blank_image", "h-b"),
                                        ImageOutcome(a, 0.2500000004, None, "h-a")],
                   manifest, created=created)
    assert _bytes(one) == _bytes(two)
    assert (str(one.ContentDate), str(one.InstanceCreationTime)) == ("20260102", "030405.678000")
    later = build_sr(a.StudyInstanceUID, [ImageOutcome(a, 0.25, None, "h-a"),
                                          ImageOutcome(b, None, "blank_image", "h-b")], manifest)
    assert later.SOPInstanceUID == one.SOPInstanceUID  # only the creation time differs


def test_every_content_input_changes_the_sr_uid(demo_bundle: Path) -> None:
    manifest = read_manifest(demo_bundle)
    image, other = make_dx(), make_dx(seed=2)
    study = str(image.StudyInstanceUID)

    def uid(study_uid: str = study, revision: int = 1,
            images: list[ImageOutcome] | None = None, model: Manifest = manifest,
            previous: str | None = None) -> str:
        chosen = images if images is not None else [ImageOutcome(image, 0.42, None, "h1")]
        return sr_instance_uid(result_key(study_uid, revision, chosen, model), previous)

    def model(**changes: object) -> Manifest:
        return dataclasses.replace(manifest, **changes)  # type: ignore[arg-type]

    t = manifest.thresholds
    variants = {
        "base": uid(),
        "study": uid(study_uid=study + ".9"),
        "revision": uid(revision=2),
        "content hash": uid(images=[ImageOutcome(image, 0.42, None, "h2")]),
        "no content hash": uid(images=[ImageOutcome(image, 0.42)]),
        "probability": uid(images=[ImageOutcome(image, 0.420001, None, "h1")]),
        "refused": uid(images=[ImageOutcome(image, None, "blank_image", "h1")]),
        "other reason": uid(images=[ImageOutcome(image, None, "too_large", "h1")]),
        "another image": uid(images=[ImageOutcome(image, 0.42, None, "h1"),
                                     ImageOutcome(other, None, "blank_image", "h3")]),
        "model name": uid(model=model(name=manifest.name + "-b")),
        "model version": uid(model=model(version=manifest.version + ".1")),
        "weights": uid(model=model(weights_sha256="0" * 64)),
        "validated": uid(model=model(validated=not manifest.validated)),
        "decision threshold": uid(model=model(thresholds=dataclasses.replace(t, decision=0.31))),
        "urgent threshold": uid(model=model(thresholds=dataclasses.replace(t, urgent=0.97))),
        "elevated threshold": uid(model=model(thresholds=dataclasses.replace(t, elevated=0.33))),
        "predecessor": uid(previous="2.25.1"),
        "other predecessor": uid(previous="2.25.2"),
    }
    assert len(set(variants.values())) == len(variants), variants
    assert uid() == uid(images=[ImageOutcome(image, 0.4200000001, None, "h1")])


def test_every_refusal_reason_has_its_own_code_and_the_sr_stays_valid(demo_bundle: Path,
                                                                      tmp_path: Path) -> None:
    reasons = [r.value for r in Refusal] + [r for r in REASON_CODES if r not in set(Refusal)]
    assert set(Refusal) <= set(REASON_CODES)
    codes = [reason_code(r) for r in reasons]
    values = [c.value for c in codes]
    assert len(set(values)) == len(values), values
    assert len({c.meaning for c in codes}) == len(codes)
    assert all(len(v) <= 16 and v.startswith("RSN-") for v in values), values
    assert all(0 < len(c.meaning) <= 64 for c in codes)
    assert reason_code(None) == reason_code("unknown")
    with pytest.raises(ValueError, match="'no_such_reason'"):
        reason_code("no_such_reason")

    manifest = read_manifest(demo_bundle)
    scored = make_dx()
    images = [ImageOutcome(scored, 0.7, None, "h0")] + [
        ImageOutcome(make_dx(study_uid=scored.StudyInstanceUID, seed=i + 1), None, reason, f"h{i}")
        for i, reason in enumerate(reasons)]
    sr = build_sr(scored.StudyInstanceUID, images, manifest)
    path = tmp_path / "reasons.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert _errors(path) == []
    rendered = subprocess.run(["/usr/bin/dsrdump", str(path)], capture_output=True, text=True).stdout
    for code in codes:
        assert f'({code.value},99OPACITYD,"{code.meaning}")' in rendered, code
    doc = (Path(__file__).resolve().parents[1] / "docs" / "sr-codes.md").read_text()
    for reason, code in REASON_CODES.items():
        assert f"| `{reason}` | {code.value} | {code.meaning} |" in doc, reason


def test_an_image_library_lists_the_scored_images_when_their_headers_describe_them(
        demo_bundle: Path, tmp_path: Path) -> None:
    """IHE AIR / TID 1600: with Patient Orientation and Imager Pixel Spacing in every scored
    header, the SR carries an Image Library entry per scored image; without them, none (the
    SR is still built), and in both cases dciodvfy finds no error."""
    manifest = read_manifest(demo_bundle)
    pa = make_dx(seed=3)
    pa.PatientOrientation = ["L", "F"]
    pa.ImagerPixelSpacing = [0.143, 0.143]
    other = make_dx(study_uid=pa.StudyInstanceUID, seed=4)
    other.PatientOrientation = ["R", "F"]
    other.ImagerPixelSpacing = [0.2, 0.2]
    bare = make_dx(seed=5)
    bare.PatientOrientation = ""  # present but empty (type 2): no entry can be written
    for name, images, entries in (
            ("described", [ImageOutcome(pa, 0.8), ImageOutcome(other, 0.1)], 2),
            ("bare", [ImageOutcome(bare, 0.8)], 0)):
        sr = build_sr(str(images[0].header.StudyInstanceUID), images, manifest)
        path = tmp_path / f"{name}.dcm"
        sr.save_as(path, enforce_file_format=True)
        assert _errors(path) == [], name
        libraries = [item for item in sr.ContentSequence
                     if item.ConceptNameCodeSequence[0].CodeValue == "111028"]
        listed = [entry for library in libraries for group in library.ContentSequence
                  for entry in group.ContentSequence if entry.ValueType == "IMAGE"]
        assert len(listed) == entries, name
        if entries:
            refs = {e.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for e in listed}
            assert refs == {pa.SOPInstanceUID, other.SOPInstanceUID}

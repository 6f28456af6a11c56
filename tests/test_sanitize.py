"""Header slips that real modalities make never stop a report: each value is kept, repaired
where the repair is certain, or dropped; the SR built from the clean copy is dciodvfy-clean;
what was done names the attribute and the problem, never the value."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset

from daemon.dicom.sanitize import Action, Problem, sanitized
from daemon.results.report import ImageOutcome, build_sr
from model.manifest import read_manifest
from tests.factories import make_dx
from tests.test_report import _errors

KEEP = None  # the value is kept as written


@contextmanager
def _writing_anything() -> Iterator[None]:
    """Let pydicom write invalid values, as a modality would."""
    settings = pydicom_config.settings
    before = settings.writing_validation_mode
    settings.writing_validation_mode = pydicom_config.IGNORE
    try:
        yield
    finally:
        settings.writing_validation_mode = before


def _as_received(values: dict[str, object], charset: str | None = None,
                 encoded: dict[str, bytes] | None = None) -> Dataset:
    """A DX header with ``values`` written raw and read back as the worker reads a spool file."""
    ds = make_dx()
    if charset is not None:
        ds.SpecificCharacterSet = charset
    with _writing_anything():
        for keyword, value in values.items():
            setattr(ds, keyword, value)
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    for placeholder_text, raw in (encoded or {}).items():
        # Replace the value bytes of an element written with a same-length placeholder.
        placeholder = placeholder_text.encode()
        assert data.count(placeholder) == 1, placeholder_text
        data = data.replace(placeholder, raw)
    return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)


# keyword, VR, written value, expected value in the clean copy ("" = dropped), problem
CASES: list[tuple[str, str, object, object, Problem | None]] = [
    ("PatientName", "PN", ["DOE^JOHN", "ROE^JANE"], "", Problem.TOO_MANY_VALUES),
    ("PatientName", "PN", "DOE^JOHN\x07", "DOE^JOHN", Problem.CONTROL_CHARACTERS),
    ("PatientName", "PN", "A" * 70, "", Problem.INVALID_FOR_VR),
    ("PatientName", "PN", "DOE^JOHN", KEEP, None),
    ("PatientBirthDate", "DA", "1970-01-31", "19700131", Problem.SEPARATORS),
    ("PatientBirthDate", "DA", "1970/01/31", "19700131", Problem.SEPARATORS),
    ("PatientBirthDate", "DA", "19700231", "", Problem.NOT_A_REAL_DATE),
    ("PatientBirthDate", "DA", "31.01.1970", "", Problem.INVALID_FOR_VR),
    ("StudyDate", "DA", "20260101", KEEP, None),
    ("StudyTime", "TM", "12:30:05", "123005", Problem.SEPARATORS),
    ("StudyTime", "TM", "12:30", "1230", Problem.SEPARATORS),
    ("StudyTime", "TM", "12:30:05.123", "123005.123", Problem.SEPARATORS),
    ("StudyTime", "TM", "256000", "", Problem.INVALID_FOR_VR),
    ("StudyTime", "TM", "noon", "", Problem.INVALID_FOR_VR),
    ("AcquisitionDateTime", "DT", "2026-01-31T12:30:05", "20260131123005", Problem.SEPARATORS),
    ("AcquisitionDateTime", "DT", "20260231", "", Problem.NOT_A_REAL_DATE),
    ("AcquisitionDateTime", "DT", "soon", "", Problem.INVALID_FOR_VR),
    ("PatientSex", "CS", "MALE", "M", Problem.WORD_FOR_CODE),
    ("PatientSex", "CS", "female", "F", Problem.WORD_FOR_CODE),
    ("PatientSex", "CS", "m", "M", Problem.CASE),
    ("PatientSex", "CS", "X", "", Problem.NOT_AN_ENUMERATED_VALUE),
    ("PatientSex", "CS", "UNKNOWN SEX VALUE", "", Problem.INVALID_FOR_VR),
    ("PatientID", "LO", "ID1\\ID2", "", Problem.TOO_MANY_VALUES),
    ("PatientID", "LO", "ID\n1", "ID1", Problem.CONTROL_CHARACTERS),
    ("PatientID", "LO", "P" * 80, "P" * 64, Problem.TOO_LONG),
    ("StudyDescription", "LO", "chest\tPA", "chest PA", Problem.CONTROL_CHARACTERS),
    ("StudyComments", "LT", "line one\r\nline two", KEEP, None),
    ("AccessionNumber", "SH", "A" * 20, "A" * 16, Problem.TOO_LONG),
    ("StudyID", "SH", "S\r\n1", "S1", Problem.CONTROL_CHARACTERS),
    ("SeriesNumber", "IS", "1.5", "", Problem.INVALID_FOR_VR),
    ("SeriesNumber", "IS", "12345678901234", "", Problem.INVALID_FOR_VR),
    ("PatientWeight", "DS", ("70.5", b"70,5"), "", Problem.INVALID_FOR_VR),
    ("PatientWeight", "DS", "1.2345678901234567", "", Problem.INVALID_FOR_VR),
    ("PatientSize", "DS", "1.8", KEEP, None),
    ("FrameOfReferenceUID", "UI", "1.2.abc", "", Problem.INVALID_FOR_VR),
    ("FrameOfReferenceUID", "UI", "1." + "2" * 70, "", Problem.INVALID_FOR_VR),
]


@pytest.mark.parametrize(("keyword", "vr", "written", "expected", "problem"), CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_each_value_is_kept_repaired_or_dropped(keyword: str, vr: str, written: object,
                                                expected: object, problem: Problem | None) -> None:
    if isinstance(written, tuple):  # a value pydicom cannot even hold: patch the bytes
        header = _as_received({keyword: written[0]}, encoded={written[0]: written[1]})
        written = written[1].decode()
    else:
        header = _as_received({keyword: written})
    clean = sanitized(header)
    found = [r for r in clean.repairs if r.keyword == keyword]
    if problem is None:
        assert found == []
        assert str(clean.dataset[keyword].value) == str(written)
        return
    assert [r.problem for r in found][-1] is problem
    action = Action.DROPPED if expected == "" else Action.REPAIRED
    assert found[-1].action is action
    value = clean.dataset[keyword].value
    assert str(value if value is not None else "") == expected
    assert clean.dataset[keyword].VR == vr


def test_details_name_the_attribute_and_problem_never_the_value() -> None:
    header = _as_received({"PatientBirthDate": "1970-13-45", "PatientName": ["SECRET^ONE", "SECRET^TWO"],
                           "PatientID": "SECRETID\\SECRETID2"})
    details = json.dumps([r.as_detail() for r in sanitized(header).repairs])
    assert "PatientBirthDate" in details and "PatientName" in details
    assert "SECRET" not in details and "1970" not in details


@pytest.mark.parametrize(("charset", "raw", "expected_charset"), [
    ("ISO_IR 100", "MÜLLER^JÖRG".encode("latin-1"), "ISO_IR 192"),
    ("ISO_IR 192", "ŁUKASZ^ŻÓŁW".encode(), "ISO_IR 192"),
    ("ISO_IR 999", "MÜLLER^JÖRG".encode("latin-1"), None),
    ("ISO 2022 IR 6\\ISO 2022 IR 87", b"YAMADA^TARO", None),
])
def test_character_sets_known_and_unknown_give_a_valid_sr(charset: str, raw: bytes,
                                                          expected_charset: str | None,
                                                          demo_bundle: Path, tmp_path: Path) -> None:
    header = _as_received({"PatientName": "Q" * len(raw)}, charset=charset.split("\\")[0]
                          if "\\" not in charset else None, encoded={"Q" * len(raw): raw})
    if "\\" in charset:
        header.SpecificCharacterSet = charset.split("\\")
    clean = sanitized(header)
    unknown = [r for r in clean.repairs if r.problem is Problem.UNKNOWN_CHARACTER_SET]
    assert bool(unknown) == (charset == "ISO_IR 999")
    if expected_charset is not None:
        assert clean.dataset.SpecificCharacterSet == expected_charset
    _assert_valid_sr(clean.dataset, demo_bundle, tmp_path)


def test_the_slips_of_the_issue_all_at_once_still_give_a_valid_sr(demo_bundle: Path,
                                                                   tmp_path: Path) -> None:
    header = _as_received({
        "PatientBirthDate": "1970-01-31", "StudyTime": "12:30:05", "PatientSex": "MALE",
        "PatientName": ["DOE^JOHN", "ROE^JANE"], "StudyDate": "2026-13-01", "PatientAge": "45",
        "ReferringPhysicianName": "DR\x00WHO", "StudyID": "S" * 30,
    }, charset="ISO_IR 999")
    clean = sanitized(header)
    assert {r.keyword for r in clean.repairs} >= {
        "PatientBirthDate", "StudyTime", "PatientSex", "PatientName", "StudyDate", "PatientAge",
        "ReferringPhysicianName", "StudyID", "SpecificCharacterSet"}
    _assert_valid_sr(clean.dataset, demo_bundle, tmp_path)


def _assert_valid_sr(header: Dataset, bundle: Path, tmp_path: Path) -> None:
    sr = build_sr(str(header.StudyInstanceUID), [ImageOutcome(header, 0.5)], read_manifest(bundle))
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert _errors(path) == []

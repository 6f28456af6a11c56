"""Eligibility classification on real chest files and on crafted headers."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from daemon.config import EligibilityConfig
from daemon.dicom.eligibility import Reason, classify
from tests.factories import make_dx

CFG = EligibilityConfig()


@pytest.mark.parametrize(("name", "reason"), [
    ("fodicom_CR-MONO1-10-chest.dcm", Reason.ELIGIBLE),
    ("siimacr_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm", Reason.ELIGIBLE),
    ("nihgcp_1.3.6.1.4.1.11129.5.5.110503645592756492463169821050252582267888.dcm",
     Reason.ELIGIBLE_BODY_PART_ASSUMED),
    ("orthanc_Issue44_Monochrome1-Jpeg.dcm", Reason.ELIGIBLE_BODY_PART_ASSUMED),
])
def test_real_chest_radiographs_are_eligible(shared_dicom: Path, name: str, reason: Reason) -> None:
    ds = pydicom.dcmread(shared_dicom / name, stop_before_pixels=False, force=True)
    assert classify(ds, CFG).eligible
    assert classify(ds, CFG).reason is reason


def _sr() -> Dataset:
    ds = make_dx()
    del ds.PixelData
    ds.Modality = "SR"
    return ds


def _own() -> Dataset:
    ds = make_dx()
    ds.Manufacturer = "opacityd"
    return ds


def _described(text: str) -> Dataset:
    ds = make_dx(body_part=None)
    ds.SeriesDescription = text
    return ds


def _oriented(row: str) -> Dataset:
    ds = make_dx(view=None)
    ds.PatientOrientation = [row, "F"]
    return ds


def _species() -> Dataset:
    ds = make_dx()
    ds.PatientSpeciesDescription = "Canis lupus familiaris"
    return ds


@pytest.mark.parametrize(("ds", "eligible", "reason"), [
    (make_dx(view="LL"), False, Reason.LATERAL_VIEW),
    (make_dx(view="LATERAL"), False, Reason.LATERAL_VIEW),
    (make_dx(view="AP"), True, Reason.ELIGIBLE),
    (make_dx(modality="CT"), False, Reason.MODALITY),
    (make_dx(body_part="KNEE"), False, Reason.NOT_CHEST),
    (_described("Thorax PA"), True, Reason.ELIGIBLE),
    (_described("Hand left"), True, Reason.ELIGIBLE_BODY_PART_ASSUMED),
    (_own(), False, Reason.OWN_OUTPUT),
    (_sr(), False, Reason.NO_PIXEL_DATA),
    (_oriented("P"), False, Reason.LATERAL_VIEW),
    (_oriented("L"), True, Reason.ELIGIBLE),
    (make_dx(view=None), True, Reason.ELIGIBLE_VIEW_ASSUMED),
    (_species(), False, Reason.NOT_HUMAN),
])
def test_crafted_headers_are_classified_with_a_reason(ds: Dataset, eligible: bool,
                                                      reason: Reason) -> None:
    verdict = classify(ds, CFG)
    assert (verdict.eligible, verdict.reason) == (eligible, reason)


def test_strict_policies_reject_unknown_body_part_and_view() -> None:
    strict = EligibilityConfig(unknown_body_part="reject", unknown_view="reject")
    assert classify(_described("Hand left"), strict).reason is Reason.BODY_PART_UNKNOWN
    assert classify(make_dx(view=None), strict).reason is Reason.VIEW_UNKNOWN

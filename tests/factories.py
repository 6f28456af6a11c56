"""Synthetic DICOM datasets for tests and benchmarks (no patient data: fixed fake values)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)

SENTINEL_PHI = {
    "PatientName": "SENTINELNAME^QUOKKA",
    "PatientID": "SENTINELPID4711",
    "PatientBirthDate": "19020304",
    "AccessionNumber": "SENTACC0815",
}


def make_dx(
    rows: int = 64,
    cols: int = 64,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    bits_stored: int = 16,
    photometric: str = "MONOCHROME2",
    modality: str = "DX",
    body_part: str | None = "CHEST",
    view: str | None = "PA",
    sop_class: str = DigitalXRayImageStorageForPresentation,
    seed: int = 0,
    phi: dict[str, str] | None = None,
) -> Dataset:
    """A DX image with random 16-bit pixels and a valid file meta header."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 2**bits_stored, size=(rows, cols), dtype=np.uint16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    values = {"PatientName": "TEST^SYNTHETIC", "PatientID": "SYN0001", "PatientBirthDate": "",
              "AccessionNumber": "", **(phi or {})}
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    ds.PatientSex = "O"
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.Modality = modality
    if body_part is not None:
        ds.BodyPartExamined = body_part
    if view is not None:
        ds.ViewPosition = view
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    return ds


def write_series(folder: Path, count: int, rows: int = 64, cols: int = 64, *,
                 study_uid: str | None = None, prefix: str = "img", **kwargs: object) -> list[Path]:
    """Write ``count`` instances of one study/series into ``folder``; returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    paths = []
    for i in range(count):
        ds = make_dx(rows, cols, study_uid=study_uid, series_uid=series_uid, seed=i, **kwargs)  # type: ignore[arg-type]
        ds.InstanceNumber = i + 1
        path = folder / f"{prefix}{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths

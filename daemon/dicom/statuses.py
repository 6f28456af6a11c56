"""C-STORE response statuses the receiver answers with (PS3.4 Annex B.2.3, PS3.7 Annex C)."""

from __future__ import annotations

import enum

from pydicom.dataset import Dataset


class StoreStatus(enum.IntEnum):
    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700
    """Refused: spool full, spool I/O error or database unavailable. The SCU should retry."""
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    """The data set could not be parsed."""
    MISSING_UID = 0xC001
    """Study, Series or SOP Instance UID (or SOP Class UID) absent."""
    INVALID_UID = 0xC002
    """A UID is present but not a valid DICOM UID."""


def status_dataset(status: StoreStatus, comment: str | None = None) -> Dataset:
    """The response's status, with an Error Comment (0000,0902) for failures."""
    ds = Dataset()
    ds.Status = int(status)
    if comment and status != StoreStatus.SUCCESS:
        ds.ErrorComment = comment[:64]
    return ds

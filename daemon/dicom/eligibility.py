"""Classify an arriving instance as eligible for scoring or not, with a reason.

Pure function of the dataset's header and the eligibility config; no pixel
access. The reason is recorded on the instance row.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pydicom.dataset import Dataset

from daemon.config import EligibilityConfig

OWN_MANUFACTURER = "opacityd"
"""Written into every object we produce, so our output can never loop back in."""


class Reason(enum.StrEnum):
    ELIGIBLE = "eligible"
    ELIGIBLE_BODY_PART_ASSUMED = "eligible_body_part_unknown"
    ELIGIBLE_VIEW_ASSUMED = "eligible_view_unknown"
    OWN_OUTPUT = "own_output"
    NO_PIXEL_DATA = "no_pixel_data"
    MODALITY = "modality_not_accepted"
    NOT_CHEST = "not_chest"
    BODY_PART_UNKNOWN = "body_part_unknown"
    LATERAL_VIEW = "lateral_view"
    VIEW_UNKNOWN = "view_unknown"
    NOT_HUMAN = "not_human"


@dataclass(frozen=True)
class Eligibility:
    eligible: bool
    reason: Reason


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return str(value).strip() if value is not None else ""


def classify(ds: Dataset, cfg: EligibilityConfig) -> Eligibility:
    """Decide whether ``ds`` should be scored.

    Order: our own output, an object without pixels, modality, species,
    body part (BodyPartExamined, else series/study description and protocol
    name keywords), then view (ViewPosition, else PatientOrientation's row
    direction: A/P means a lateral projection).
    """
    if _text(ds, "Manufacturer").lower() == OWN_MANUFACTURER:
        return Eligibility(False, Reason.OWN_OUTPUT)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        return Eligibility(False, Reason.NO_PIXEL_DATA)
    if _text(ds, "Modality").upper() not in cfg.modalities:
        return Eligibility(False, Reason.MODALITY)
    species = _text(ds, "PatientSpeciesDescription").lower()
    if species and "human" not in species and "homo sapiens" not in species:
        return Eligibility(False, Reason.NOT_HUMAN)

    reasons: list[Reason] = []
    body_part = _text(ds, "BodyPartExamined").upper()
    if body_part:
        if body_part not in cfg.body_parts:
            return Eligibility(False, Reason.NOT_CHEST)
    else:
        descriptions = " ".join(
            _text(ds, k) for k in ("SeriesDescription", "ProtocolName", "StudyDescription")
        ).lower()
        if not any(word in descriptions for word in cfg.chest_keywords):
            if cfg.unknown_body_part == "reject":
                return Eligibility(False, Reason.BODY_PART_UNKNOWN)
            reasons.append(Reason.ELIGIBLE_BODY_PART_ASSUMED)

    view = _text(ds, "ViewPosition").upper()
    orientation = ds.get("PatientOrientation")
    row_direction = str(orientation[0]).upper() if orientation and len(orientation) == 2 else ""
    if view in cfg.lateral_views:
        return Eligibility(False, Reason.LATERAL_VIEW)
    if view not in cfg.frontal_views:
        if row_direction[:1] in ("A", "P"):
            return Eligibility(False, Reason.LATERAL_VIEW)
        if not row_direction:
            if cfg.unknown_view == "reject":
                return Eligibility(False, Reason.VIEW_UNKNOWN)
            reasons.append(Reason.ELIGIBLE_VIEW_ASSUMED)
    return Eligibility(True, reasons[0] if reasons else Reason.ELIGIBLE)

"""The result as a DICOM Comprehensive SR with a TID 1500 Measurement Report, built with highdicom.

Codes are listed with their sources in docs/sr-codes.md. Standard codes are
used where one exists (SNOMED CT, DICOM); values with no standard code come
from the private coding scheme ``99OPACITYD`` (PS3.16 8.2 allows a "99"
private scheme designator).

Identity: :func:`result_key` hashes every input the SR's content depends on
(study, revision, each image with its content hash and its rounded probability
or refusal, the model's name, version, weights hash, preprocessing and
thresholds); :func:`sr_instance_uid` derives the SOP Instance UID from that key
and the predecessor SR's UID. One UID therefore always means one content: only
the creation date and time differ between two builds, and they are a parameter
of :func:`build_sr`.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.valuerep import DT

from daemon.config import ModelConfig
from daemon.dicom.eligibility import OWN_MANUFACTURER
from daemon.dicom.eligibility import Reason as Ineligibility
from model.errors import Refusal
from model.manifest import NOT_FOR_CLINICAL_USE, Manifest, Thresholds

SCHEME = "99OPACITYD"
PLAIN_CHEST_XRAY = Code("399208008", "SCT", "Plain chest X-ray")
LUNG = Code("39607008", "SCT", "Lung structure")
OPACITY = Code("112001", "DCM", "Opacity")
PRESENT = Code("52101004", "SCT", "Present")
ABSENT = Code("2667000", "SCT", "Absent")
NO_UNITS = Code("1", "UCUM", "no units")
PROBABILITY = Code("OPA-001", SCHEME, "Probability of lung opacity")
THRESHOLD = Code("OPA-002", SCHEME, "Decision threshold")
PRIORITY = Code("OPA-003", SCHEME, "Worklist priority")
IMAGE_NOT_ANALYSABLE = Code("OPA-004", SCHEME, "Image not analysable")
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
PROBABILITY_DIGITS = 6
"""Probabilities are written (and enter the result key) rounded to this many decimals."""

UNKNOWN_REASON = "unknown"
"""The reason recorded for an unscored image that came without one."""

REASON_CODES: Mapping[str, Code] = {
    # Why an eligible image could not be scored (model.errors.Refusal). Values that earlier
    # versions already wrote unambiguously are kept, so SRs at a PACS keep their meaning; the
    # ambiguous "RSN-UNSUPPORTED_" (two reasons) is retired. docs/sr-codes.md has the table.
    Refusal.NOT_READABLE: Code("RSN-NOT_READABLE", SCHEME, "Not a readable DICOM image"),
    Refusal.NO_PIXEL_DATA: Code("RSN-NO_PIXEL_DAT", SCHEME, "No pixel data"),
    Refusal.TOO_LARGE: Code("RSN-TOO_LARGE", SCHEME, "Image too large"),
    Refusal.NOT_GRAYSCALE: Code("RSN-NOT_GRAYSCAL", SCHEME, "Not a grayscale image"),
    Refusal.UNSUPPORTED_PHOTOMETRIC: Code("RSN-PHOTOMETRIC", SCHEME,
                                          "Unsupported photometric interpretation"),
    Refusal.UNSUPPORTED_TRANSFER_SYNTAX: Code("RSN-TRANSFER_SYN", SCHEME,
                                              "Unsupported transfer syntax"),
    Refusal.CORRUPT_PIXEL_DATA: Code("RSN-CORRUPT_PIXE", SCHEME, "Corrupt pixel data"),
    Refusal.BLANK_IMAGE: Code("RSN-BLANK_IMAGE", SCHEME, "Blank image"),
    # Why an image was not eligible (daemon.dicom.eligibility.Reason), should a caller list one.
    Ineligibility.OWN_OUTPUT: Code("RSN-OWN_OUTPUT", SCHEME, "Produced by opacityd itself"),
    Ineligibility.MODALITY: Code("RSN-MODALITY", SCHEME, "Modality not accepted"),
    Ineligibility.NOT_CHEST: Code("RSN-NOT_CHEST", SCHEME, "Not a chest image"),
    Ineligibility.BODY_PART_UNKNOWN: Code("RSN-BODYPART_UNK", SCHEME, "Body part unknown"),
    Ineligibility.LATERAL_VIEW: Code("RSN-LATERAL_VIEW", SCHEME, "Lateral view"),
    Ineligibility.VIEW_UNKNOWN: Code("RSN-VIEW_UNKNOWN", SCHEME, "View position unknown"),
    Ineligibility.NOT_HUMAN: Code("RSN-NOT_HUMAN", SCHEME, "Not a human patient"),
    UNKNOWN_REASON: Code("RSN-UNKNOWN", SCHEME, "Reason not recorded"),
}
"""One code per reason an image is listed as not analysable; values are unique and at most
16 characters (SH). Never reuse or change a value: a PACS keeps the SRs that carry it."""


class Priority(enum.StrEnum):
    URGENT = "urgent"
    ELEVATED = "elevated"
    ROUTINE = "routine"
    NOT_ANALYSABLE = "not_analysable"

    @property
    def code(self) -> Code:
        return Code(f"PRI-{self.value.upper()}", SCHEME, self.value.replace("_", " ").capitalize())


def with_threshold_overrides(manifest: Manifest, site: ModelConfig) -> Manifest:
    """The manifest with the site's configured thresholds (-1 keeps the bundle's value).

    Raises :class:`BundleError` (from :meth:`Thresholds.check`) when the result is invalid."""
    current = manifest.thresholds
    chosen = Thresholds(
        decision=current.decision if site.decision_threshold < 0 else site.decision_threshold,
        urgent=current.urgent if site.urgent_threshold < 0 else site.urgent_threshold,
        elevated=current.elevated if site.elevated_threshold < 0 else site.elevated_threshold,
    )
    chosen.check()
    return dataclasses.replace(manifest, thresholds=chosen)


def priority_for(probability: float | None, manifest: Manifest) -> Priority:
    """``urgent`` at or above the urgent threshold, ``elevated`` at or above elevated."""
    if probability is None:
        return Priority.NOT_ANALYSABLE
    if probability >= manifest.thresholds.urgent:
        return Priority.URGENT
    if probability >= manifest.thresholds.elevated:
        return Priority.ELEVATED
    return Priority.ROUTINE


@dataclass(frozen=True)
class ImageOutcome:
    header: Dataset
    """The source instance's header (no pixel data needed)."""
    probability: float | None
    refusal: str | None = None
    """Why the image could not be scored: a key of :data:`REASON_CODES` (None: ``unknown``)."""
    content_hash: str | None = None
    """sha256 of the instance's stored bytes (``instances.content_hash``); part of the result key,
    so a re-sent instance with other bytes never reuses an SR UID."""

    @property
    def sop_instance_uid(self) -> str:
        return str(self.header.SOPInstanceUID)


_TYPE2_PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                        "AccessionNumber", "StudyID", "StudyDate", "StudyTime",
                        "ReferringPhysicianName")


def _evidence(header: Dataset) -> Dataset:
    """A copy of the source header with absent type 2 patient/study attributes present and
    empty, as the SR's Patient and General Study modules require; values are copied as they are."""
    ds = Dataset()
    ds.update(header)
    for keyword in _TYPE2_PATIENT_STUDY:
        if keyword not in ds:
            setattr(ds, keyword, "")
    return ds


def study_probability(images: Sequence[ImageOutcome]) -> float | None:
    """The maximum over the scored images (a study is as abnormal as its most abnormal
    frontal image), rounded as the SR writes it, so the decision and the priority follow from
    what the SR says; None when no image could be scored."""
    return max((_rounded(i.probability) for i in images if i.probability is not None),
               default=None)


def reason_code(reason: str | None) -> Code:
    """The coded reason an image is not analysable. Raises :class:`ValueError` naming a reason
    that has no code in :data:`REASON_CODES` (add one there and in docs/sr-codes.md)."""
    try:
        return REASON_CODES[reason or UNKNOWN_REASON]
    except KeyError:
        raise ValueError(f"refusal reason {reason!r} has no code in daemon.results.report.REASON_CODES; "
                         f"known: {', '.join(sorted(REASON_CODES))}") from None


def deterministic_uid(*parts: str) -> str:
    """A 2.25 UID (PS3.5 B.2) from a hash of ``parts``: the same inputs give the same UID."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()[:16]
    return f"2.25.{int.from_bytes(digest, 'big')}"


def sr_series_uid(study_uid: str, manifest: Manifest) -> str:
    """One AI output series per study and model name, so later SRs join it."""
    return deterministic_uid(study_uid, "opacityd-sr-series", manifest.name)


def _rounded(probability: float) -> float:
    return round(float(probability), PROBABILITY_DIGITS)


def _in_sr_order(images: Sequence[ImageOutcome]) -> list[ImageOutcome]:
    """The images in the order the SR lists them (by SOP Instance UID), so the content does
    not depend on the order the instances arrived in."""
    return sorted(images, key=lambda i: i.sop_instance_uid)


def result_key(study_uid: str, revision: int, images: Sequence[ImageOutcome],
               manifest: Manifest) -> str:
    """A sha256 (hex) of every input the SR's content depends on, except its predecessor: the
    study UID and revision; each image's SOP Instance UID and content hash with its probability
    as written (rounded to :data:`PROBABILITY_DIGITS`) or its refusal reason; the model's name,
    version, weights sha256, validated flag and preprocessing; and the three thresholds.

    Two scorings with the same key produce the same SR content: the worker records it on the
    result (detail ``"key"``) and produces no new SR when the latest result has the same key.
    Raises :class:`ValueError` for a refusal reason without a code (see :func:`reason_code`)."""
    entries: list[dict[str, object]] = []
    for image in _in_sr_order(images):
        entry: dict[str, object] = {"sop": image.sop_instance_uid, "hash": image.content_hash}
        if image.probability is not None:
            entry["probability"] = _rounded(image.probability)
        else:
            entry["refused"] = reason_code(image.refusal).value
        entries.append(entry)
    content = {
        "schema": 1,
        "study": study_uid,
        "revision": revision,
        "images": entries,
        "model": {"name": manifest.name, "version": manifest.version,
                  "weights_sha256": manifest.weights_sha256, "validated": manifest.validated,
                  "preprocessing": manifest.preprocessing.to_json()},
        "thresholds": dataclasses.asdict(manifest.thresholds),
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":"))
                          .encode()).hexdigest()


def sr_instance_uid(key: str, previous_uid: str | None) -> str:
    """The SR's SOP Instance UID from its :func:`result_key` and the SOP Instance UID of the SR
    it supersedes (None for the first): the same content always gets the same UID, and a UID
    never names two contents."""
    return deterministic_uid("opacityd-sr", key, previous_uid or "")


def sr_reference(study_uid: str, series_uid: str, sop_instance_uid: str) -> Dataset:
    """What :func:`build_sr` needs of a predecessor SR (``previous``) when its file is not at
    hand: the result row holds all of it."""
    ds = Dataset()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SOPClassUID = COMPREHENSIVE_SR
    ds.SOPInstanceUID = sop_instance_uid
    return ds


def _algorithm(manifest: Manifest) -> hd.sr.AlgorithmIdentification:
    parameters = [f"decision threshold {manifest.thresholds.decision}",
                  f"urgent threshold {manifest.thresholds.urgent}",
                  f"elevated threshold {manifest.thresholds.elevated}",
                  f"input {manifest.input_size} px, {manifest.preprocessing.pipeline}"]
    if not manifest.validated:
        parameters.append(NOT_FOR_CLINICAL_USE)
    return hd.sr.AlgorithmIdentification(name=manifest.name, version=manifest.version,
                                         parameters=parameters, manufacturer=OWN_MANUFACTURER)


def _group(label: str, uid_seed: Sequence[str], manifest: Manifest, sources: Sequence[Dataset],
           measurements: Sequence[hd.sr.Measurement],
           evaluations: Sequence[hd.sr.QualitativeEvaluation]
           ) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=deterministic_uid(*uid_seed), identifier=label),
        finding_type=OPACITY,
        finding_sites=[hd.sr.FindingSite(LUNG)],
        algorithm_id=_algorithm(manifest),
        measurements=list(measurements) or None,
        qualitative_evaluations=list(evaluations) or None,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(ds) for ds in sources]
        or None,
    )


_LIBRARY_SOP_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
    "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image Storage - For Processing
})
"""Image classes whose Image Library entries highdicom writes with projection descriptors
(a Secondary Capture has no coded modality there)."""


def _describable(header: Dataset) -> bool:
    """True when highdicom can write the TID 1602 Image Library entry of this header: a CR
    or DX storage class and modality, rows and columns, a Patient Orientation of two non-empty
    values and an Imager Pixel Spacing of two positive numbers. Chest headers often lack the
    last two; such an image gets no entry rather than invented ones."""
    try:
        orientation = [str(value).strip() for value in header.get("PatientOrientation") or []]
        spacing = [float(value) for value in header.get("ImagerPixelSpacing") or []]
        size = (int(header.Rows), int(header.Columns))
    except (TypeError, ValueError, AttributeError):
        return False
    return (str(header.get("SOPClassUID", "")) in _LIBRARY_SOP_CLASSES
            and header.get("Modality") in ("CR", "DX") and len(orientation) == 2
            and all(orientation) and len(spacing) == 2 and all(v > 0 for v in spacing)
            and min(size) > 0)


def _library(scored: Sequence[ImageOutcome]) -> list[Dataset] | None:
    """The headers for the Image Library (TID 1600; IHE AIR, docs/conformance.md section 7):
    every scored image when each can be described, else None (no library)."""
    headers = [i.header for i in scored]
    return headers if headers and all(_describable(h) for h in headers) else None


def _probability(value: float) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=PROBABILITY, value=_rounded(value), unit=NO_UNITS)


def build_sr(study_uid: str, images: Sequence[ImageOutcome], manifest: Manifest, *,
             revision: int = 1, previous: Dataset | None = None,
             created: datetime | None = None) -> Dataset:
    """The Comprehensive SR for one study. The study probability is the maximum over its
    scored images (a study is as abnormal as its most abnormal frontal image).

    ``previous``: the SR this one supersedes (its file, or :func:`sr_reference`); it is listed
    in the Predecessor Documents Sequence. The SOP Instance UID is
    ``sr_instance_uid(result_key(study_uid, revision, images, manifest), previous UID)``.
    ``created``: the Content and Instance Creation Date/Time (default: now, local time); with
    the same ``created`` the same inputs give the same bytes.
    Raises :class:`ValueError` for a refusal reason without a code (see :func:`reason_code`)."""
    images = _in_sr_order(images)
    key = result_key(study_uid, revision, images, manifest)
    previous_uid = str(previous.SOPInstanceUID) if previous is not None else None
    scored = [i for i in images if i.probability is not None]
    refused = [i for i in images if i.probability is None]
    study_p = study_probability(images)
    priority = priority_for(study_p, manifest)
    study_measurements = []
    study_evaluations = [hd.sr.QualitativeEvaluation(PRIORITY, priority.code)]
    if study_p is not None:
        study_measurements = [_probability(study_p),
                              hd.sr.Measurement(name=THRESHOLD, value=manifest.thresholds.decision,
                                                unit=NO_UNITS)]
        present = study_p >= manifest.thresholds.decision
        study_evaluations.insert(0, hd.sr.QualitativeEvaluation(OPACITY, PRESENT if present else ABSENT))
    groups = [_group("study", [study_uid, "study", manifest.version], manifest,
                     [i.header for i in scored], study_measurements, study_evaluations)]
    for image in scored:
        sop = image.sop_instance_uid
        groups.append(_group(f"image {sop}"[:64], [study_uid, sop, manifest.version], manifest,
                             [image.header], [_probability(float(image.probability or 0.0))], []))
    for image in refused:
        sop = image.sop_instance_uid
        groups.append(_group(f"refused {sop}"[:64], [study_uid, sop, "refused"], manifest,
                             [image.header], [],
                             [hd.sr.QualitativeEvaluation(IMAGE_NOT_ANALYSABLE,
                                                          reason_code(image.refusal))]))
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=deterministic_uid("opacityd-device", manifest.name, manifest.version),
            name="opacityd", manufacturer_name=OWN_MANUFACTURER,
            model_name=f"{manifest.name} {manifest.version}"[:64]))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PLAIN_CHEST_XRAY,
        imaging_measurements=groups,
        referenced_images=_library(scored),
    )
    description = "AI lung opacity score"
    if not manifest.validated:
        description += f" - {NOT_FOR_CLINICAL_USE}"
    evidence = [_evidence(i.header) for i in images]
    when = created or datetime.now()
    sr = hd.sr.ComprehensiveSR(
        evidence=evidence,
        content=report,
        series_instance_uid=sr_series_uid(study_uid, manifest),
        series_number=9901,
        sop_instance_uid=sr_instance_uid(key, previous_uid),
        instance_number=revision,
        manufacturer=OWN_MANUFACTURER,
        is_complete=True,
        previous_versions=[previous] if previous is not None else None,
        series_description=description[:64],
        manufacturer_model_name=manifest.name[:64],
        software_versions=manifest.version[:64],
        content_date=when.date(),
        content_time=when.time(),
    )
    # highdicom stamps the instance creation and its own contribution with its clock: make
    # them the same moment, so nothing in the SR depends on when it was built but ``created``.
    sr.InstanceCreationDate = sr.ContentDate
    sr.InstanceCreationTime = sr.ContentTime
    for item in sr.get("ContributingEquipmentSequence", []):
        item.ContributionDateTime = DT(when)
    return sr

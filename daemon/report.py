"""The result as a DICOM Comprehensive SR with a TID 1500 Measurement Report, built with highdicom.

Codes are listed with their sources in docs/sr-codes.md. Standard codes are
used where one exists (SNOMED CT, DICOM); values with no standard code come
from the private coding scheme ``99OPACITYD`` (PS3.16 8.2 allows a "99"
private scheme designator).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from daemon.config import ModelConfig
from daemon.eligibility import OWN_MANUFACTURER
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
    frontal image); None when no image could be scored."""
    return max((i.probability for i in images if i.probability is not None), default=None)


def _reason_code(reason: str) -> Code:
    return Code(f"RSN-{reason.upper()}"[:16], SCHEME, reason.replace("_", " "))


def deterministic_uid(*parts: str) -> str:
    """A 2.25 UID (PS3.5 B.2) from a hash of ``parts``: the same inputs give the same UID."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()[:16]
    return f"2.25.{int.from_bytes(digest, 'big')}"


def sr_series_uid(study_uid: str, manifest: Manifest) -> str:
    """One AI output series per study and model name, so later SRs join it."""
    return deterministic_uid(study_uid, "opacityd-sr-series", manifest.name)


def sr_instance_uid(study_uid: str, scored: Sequence[str], manifest: Manifest) -> str:
    """Deterministic: the same study, scored instances and model give the same SOP Instance UID,
    so a re-send is the same object and the PACS de-duplicates it."""
    return deterministic_uid(study_uid, *sorted(scored), manifest.name, manifest.version)


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


def _probability(value: float) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=PROBABILITY, value=round(value, 6), unit=NO_UNITS)


def build_sr(study_uid: str, images: Sequence[ImageOutcome], manifest: Manifest, *,
             revision: int = 1, previous: Dataset | None = None) -> Dataset:
    """The Comprehensive SR for one study. The study probability is the maximum over its
    scored images (a study is as abnormal as its most abnormal frontal image)."""
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
        sop = str(image.header.SOPInstanceUID)
        groups.append(_group(f"image {sop}"[:64], [study_uid, sop, manifest.version], manifest,
                             [image.header], [_probability(float(image.probability or 0.0))], []))
    for image in refused:
        sop = str(image.header.SOPInstanceUID)
        groups.append(_group(f"refused {sop}"[:64], [study_uid, sop, "refused"], manifest,
                             [image.header], [],
                             [hd.sr.QualitativeEvaluation(IMAGE_NOT_ANALYSABLE,
                                                          _reason_code(image.refusal or "unknown"))]))
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
    )
    description = "AI lung opacity score"
    if not manifest.validated:
        description += f" - {NOT_FOR_CLINICAL_USE}"
    evidence = [_evidence(i.header) for i in images]
    sr = hd.sr.ComprehensiveSR(
        evidence=evidence,
        content=report,
        series_instance_uid=sr_series_uid(study_uid, manifest),
        series_number=9901,
        sop_instance_uid=sr_instance_uid(study_uid, [str(i.header.SOPInstanceUID) for i in scored],
                                         manifest),
        instance_number=revision,
        manufacturer=OWN_MANUFACTURER,
        is_complete=True,
        previous_versions=[previous] if previous is not None else None,
        series_description=description[:64],
        manufacturer_model_name=manifest.name[:64],
        software_versions=manifest.version[:64],
    )
    return sr

"""SIIM-FISABIO-RSNA COVID-19 Detection (Kaggle 2021), as shipped or as a resized variant.

Label rule (the thesis's): the study label decides: "Negative for Pneumonia" -> none;
"Typical", "Indeterminate", "Atypical Appearance" -> opacity. The image-level label
("none 1 0 0 1 1" or "opacity ...") disagrees with it for some images; they are counted.

Group: the patient. PatientID comes from each DICOM header, or for a resized copy from a
metadata CSV; an image with neither is grouped by its study. The group is a hash of the
PatientID, so run folders carry no identifier from the headers.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from tqdm import tqdm

from training.records import Label, LayoutError, Problem, Record, SourceScan, read_csv

SOURCE = "siim"
STUDY_CSV = "train_study_level.csv"
IMAGE_CSV = "train_image_level.csv"
STUDY_LABELS = {
    "Negative for Pneumonia": Label.NONE,
    "Typical Appearance": Label.OPACITY,
    "Indeterminate Appearance": Label.OPACITY,
    "Atypical Appearance": Label.OPACITY,
}
RESIZED_SUFFIXES = (".png", ".jpg", ".jpeg")


def _image_index(images: Path) -> dict[str, Path]:
    """Image id -> file, for the DICOM tree train/<study>/<series>/<id>.dcm or a flat resize."""
    if not images.is_dir():
        raise LayoutError(f"expected the image folder {images} (train/<study>/<series>/<image>.dcm "
                          "or train/<image id>.jpg|png)")
    index: dict[str, Path] = {}
    for path in images.rglob("*"):
        if path.suffix.lower() in (".dcm", *RESIZED_SUFFIXES) and path.is_file():
            index.setdefault(path.stem, path)
    return index


def _study_labels(root: Path) -> tuple[dict[str, tuple[str, Label]], list[str]]:
    rows = read_csv(root / STUDY_CSV)
    if rows and not {"id", *STUDY_LABELS} <= set(rows[0]):
        raise LayoutError(f"{root / STUDY_CSV} must have the columns id, {', '.join(STUDY_LABELS)}")
    labels: dict[str, tuple[str, Label]] = {}
    notes: list[str] = []
    for row in rows:
        study = row["id"].removesuffix("_study")
        marked = [name for name in STUDY_LABELS if row[name].strip() in ("1", "1.0")]
        if len(marked) != 1:
            notes.append(f"study {study}: {len(marked)} study labels set; skipped")
            continue
        labels[study] = (marked[0], STUDY_LABELS[marked[0]])
    return labels, notes


def _patient_group(patient_id: str) -> str:
    return "patient:" + hashlib.sha256(patient_id.encode()).hexdigest()[:16]


def _metadata_patients(metadata: Path) -> dict[str, str]:
    """Image id -> PatientID from a metadata CSV (columns id or image_id; PatientID or patient_id)."""
    rows = read_csv(metadata)
    if not rows:
        return {}
    id_column = next((c for c in ("id", "image_id") if c in rows[0]), None)
    patient_column = next((c for c in ("PatientID", "patient_id") if c in rows[0]), None)
    if id_column is None or patient_column is None:
        raise LayoutError(f"{metadata} must have an id (or image_id) and a PatientID (or patient_id) "
                          f"column (has {', '.join(rows[0])})")
    return {r[id_column].removesuffix("_image"): r[patient_column].strip()
            for r in rows if r[patient_column].strip()}


def _header_patient(path: Path) -> str:
    """PatientID from a DICOM header ("" when the file is not DICOM or has none)."""
    if path.suffix.lower() != ".dcm":
        return ""
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"])
    except (InvalidDicomError, OSError, ValueError):
        return ""
    return str(header.get("PatientID", "") or "").strip()


def patient_notes(records: list[Record], from_headers: int, from_metadata: int) -> list[str]:
    """How the images were grouped, and how many patients have more than one study."""
    studies: dict[str, set[str]] = defaultdict(set)
    for record in records:
        if record.group.startswith("patient:"):
            studies[record.group].add(record.study)
    several = sum(1 for s in studies.values() if len(s) > 1)
    by_study = len(records) - from_headers - from_metadata
    return [f"patients: {len(studies)} (PatientID from {from_headers} DICOM headers and "
            f"{from_metadata} metadata rows; {by_study} images grouped by study instead)",
            f"patients with more than one study: {several}"]


def scan(root: Path, images: Path | None = None, metadata: Path | None = None) -> SourceScan:
    if not root.is_dir():
        raise LayoutError(f"expected the SIIM dataset folder {root}")
    studies, notes = _study_labels(root)
    image_rows = read_csv(root / IMAGE_CSV)
    if image_rows and not {"id", "label", "StudyInstanceUID"} <= set(image_rows[0]):
        raise LayoutError(f"{root / IMAGE_CSV} must have the columns id, label, StudyInstanceUID")
    index = _image_index(images or root / "train")
    from_metadata = _metadata_patients(metadata) if metadata else {}
    records: list[Record] = []
    problems: list[Problem] = []
    disagree_none = disagree_opacity = 0
    for row in image_rows:
        image_id = row["id"].removesuffix("_image")
        study = row["StudyInstanceUID"]
        if study not in studies:
            problems.append(Problem(image_id, "", SOURCE, "no_study_label",
                                    f"study {study} is not in {STUDY_CSV}"))
            continue
        original, label = studies[study]
        image_says = row["label"].split(" ", 1)[0]
        if image_says == "none" and label is Label.OPACITY:
            disagree_none += 1
        elif image_says == "opacity" and label is Label.NONE:
            disagree_opacity += 1
        path = index.get(image_id)
        if path is None:
            problems.append(Problem(image_id, "", SOURCE, "missing",
                                    f"no {image_id}.dcm/.jpg/.png under the image folder"))
            continue
        records.append(Record(image_id, str(path), SOURCE, original, label, group=study, study=study))
    headers = metadata_rows = 0
    grouped: list[Record] = []
    for record in tqdm(records, desc="siim patient ids", unit="img"):
        patient = from_metadata.get(record.image_id, "")
        if patient:
            metadata_rows += 1
        else:
            patient = _header_patient(Path(record.path))
            headers += bool(patient)
        grouped.append(Record(record.image_id, record.path, SOURCE, record.original_label, record.label,
                              group=_patient_group(patient) if patient else f"study:{record.study}",
                              study=record.study))
    records = grouped
    notes += patient_notes(records, headers, metadata_rows)
    notes.append(f"image-level label 'none' in an opacity study: {disagree_none} images "
                 "(study label used)")
    notes.append(f"image-level label 'opacity' in a negative study: {disagree_opacity} images "
                 "(study label used)")
    return SourceScan(SOURCE, records, problems, notes)

"""SIIM-FISABIO-RSNA COVID-19 Detection (Kaggle 2021), as shipped or as a resized variant.

Label rule (the thesis's): the study label decides: "Negative for Pneumonia" -> none;
"Typical", "Indeterminate", "Atypical Appearance" -> opacity. The image-level label
("none 1 0 0 1 1" or "opacity ...") disagrees with it for some images; they are counted.
"""

from __future__ import annotations

from pathlib import Path

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


def scan(root: Path, images: Path | None = None) -> SourceScan:
    if not root.is_dir():
        raise LayoutError(f"expected the SIIM dataset folder {root}")
    studies, notes = _study_labels(root)
    image_rows = read_csv(root / IMAGE_CSV)
    if image_rows and not {"id", "label", "StudyInstanceUID"} <= set(image_rows[0]):
        raise LayoutError(f"{root / IMAGE_CSV} must have the columns id, label, StudyInstanceUID")
    index = _image_index(images or root / "train")
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
        records.append(Record(image_id, str(path), SOURCE, original, label, group=study))
    notes.append(f"image-level label 'none' in an opacity study: {disagree_none} images "
                 "(study label used)")
    notes.append(f"image-level label 'opacity' in a negative study: {disagree_opacity} images "
                 "(study label used)")
    return SourceScan(SOURCE, records, problems, notes)

"""Tiny datasets in the exact Kaggle layouts, generated: SIIM-FISABIO-RSNA (DICOM tree + the two
CSVs) and the COVID-19 Radiography Database (class folders of PNGs), with the awkward cases
the real data has: image/study label disagreements, a missing file, a duplicate image, a
patient with two studies and (on request) near-duplicate copies of a SIIM image filed under
the Radiography Database's COVID class."""

from __future__ import annotations

import csv
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from tests.factories import make_dx

SIIM_COLUMNS = ["Negative for Pneumonia", "Typical Appearance", "Indeterminate Appearance",
                "Atypical Appearance"]


@dataclass
class TinyData:
    siim: Path
    radiography: Path
    study_of_image: dict[str, str] = field(default_factory=dict)
    study_label: dict[str, str] = field(default_factory=dict)
    missing_image: str = ""
    disagreeing_image: str = ""
    patient_of_study: dict[str, str] = field(default_factory=dict)
    near_duplicates: dict[str, str] = field(default_factory=dict)
    """Planted copy (image id) -> the SIIM image id it copies."""


def _texture(seed: int, size: int = 96) -> np.ndarray:
    """A chest-like gray picture: a bright frame, two darker lungs (placed and sized by the
    seed), a few soft blobs, noise. Different seeds give pictures that are not near-duplicates."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    image = 0.8 - 0.1 * y
    for centre in (0.3, 0.7):
        cx, cy = centre + rng.uniform(-0.06, 0.06), 0.5 + rng.uniform(-0.08, 0.08)
        sx, sy = rng.uniform(0.09, 0.15), rng.uniform(0.18, 0.3)
        image = image - 0.45 * np.exp(-(((x - cx) / sx) ** 2 + ((y - cy) / sy) ** 2))
    for _ in range(4):
        bx, by, r = rng.uniform(0.15, 0.85), rng.uniform(0.15, 0.85), rng.uniform(0.04, 0.1)
        image = image + rng.uniform(-0.25, 0.25) * np.exp(-(((x - bx) ** 2 + (y - by) ** 2) / r ** 2))
    image = image + 0.05 * rng.random((size, size))
    return np.clip(image, 0, 1)


def make_siim(root: Path, studies: int = 20) -> TinyData:
    data = TinyData(root / "siim", root / "radiography")
    study_rows, image_rows = [], []
    for s in range(studies):
        study = f"s{s:03d}"
        negative = s < studies // 2
        column = SIIM_COLUMNS[0] if negative else SIIM_COLUMNS[1 + s % 3]
        study_rows.append({"id": f"{study}_study", **{c: int(c == column) for c in SIIM_COLUMNS}})
        data.study_label[study] = "none" if negative else "opacity"
        for k in range(2 if s in (0, studies // 2) else 1):
            image_id = f"i{s:03d}{k}"
            label = "none 1 0 0 1 1" if negative else "opacity 0.9 10 10 40 40"
            if s == studies // 2 + 1:
                label = "none 1 0 0 1 1"  # the image says none, the study says opacity
                data.disagreeing_image = image_id
            if s == 1:
                label = "opacity 0.5 10 10 40 40"  # the image says opacity, the study says negative
            image_rows.append({"id": f"{image_id}_image", "boxes": "", "label": label,
                               "StudyInstanceUID": study})
            data.study_of_image[image_id] = study
            ds = make_dx(96, 96, study_uid=f"1.2.826.0.1.3680043.8.498.{s + 1}", seed=s * 10 + k)
            # One patient per study, except studies 2 and 3: one patient, two studies.
            patient = "PAT002" if s in (2, 3) else f"PAT{s:03d}"
            ds.PatientID = data.patient_of_study.setdefault(study, patient)
            ds.PixelData = (_texture(s * 10 + k) * 4000).astype(np.uint16).tobytes()
            folder = data.siim / "train" / study / f"series{s}"
            folder.mkdir(parents=True, exist_ok=True)
            ds.save_as(folder / f"{image_id}.dcm", enforce_file_format=True)
    data.missing_image = "i9990"
    image_rows.append({"id": "i9990_image", "boxes": "", "label": "none 1 0 0 1 1",
                       "StudyInstanceUID": "s000"})
    for name, rows in (("train_study_level.csv", study_rows), ("train_image_level.csv", image_rows)):
        with (data.siim / name).open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return data


def make_radiography(data: TinyData, per_class: int = 4) -> None:
    for c, folder in enumerate(("COVID", "Lung_Opacity", "Normal", "Viral Pneumonia")):
        images = data.radiography / folder / "images"
        images.mkdir(parents=True)
        for i in range(per_class):
            pixels = (_texture(1000 + c * 100 + i, 80) * 255).astype(np.uint8)
            Image.fromarray(pixels).save(images / f"{folder}-{i + 1}.png")
        if folder != "Viral Pneumonia":
            (data.radiography / f"{folder}.metadata.xlsx").write_bytes(b"")
    # The same picture filed under two classes (the real database has such duplicates).
    shutil.copy(data.radiography / "Normal" / "images" / "Normal-1.png",
                data.radiography / "Lung_Opacity" / "images" / "Lung_Opacity-99.png")


def plant_near_duplicates(data: TinyData, image_id: str = "i0040") -> None:
    """Three copies of SIIM image ``image_id`` (study s004, seed 40) as the COVID class's
    images: re-encoded as JPEG, resized (as a PNG), and shifted by 2 px (about 2 %)."""
    pixels = (_texture(40) * 255).astype(np.uint8)
    folder = data.radiography / "COVID" / "images"
    Image.fromarray(pixels).save(folder / "COVID-901.jpg", quality=70)
    Image.fromarray(pixels).resize((131, 131), Image.Resampling.BILINEAR).save(folder / "COVID-902.png")
    shifted = np.pad(pixels, ((2, 0), (2, 0)), mode="edge")[:96, :96]
    Image.fromarray(shifted).save(folder / "COVID-903.png")
    for name in ("COVID-901", "COVID-902", "COVID-903"):
        data.near_duplicates[f"radiography:{name}"] = image_id


def make_tiny_data(root: Path, near_duplicates: bool = False) -> TinyData:
    data = make_siim(root)
    make_radiography(data)
    if near_duplicates:
        plant_near_duplicates(data)
    return data


def write_training_config(path: Path, tiny: TinyData, **sections: dict[str, object]) -> Path:
    """A fast config over the tiny data: 71 px, from scratch (whole network), one short epoch per
    phase."""
    base: dict[str, dict[str, object]] = {
        "data": {"siim": str(tiny.siim), "radiography": str(tiny.radiography),
                 "max_missing_fraction": 0.1},
        "model": {"input_size": 71, "weights": "none"},
        "train": {"batch_size": 4, "steps_per_epoch": 2},
        "phase1": {"epochs": 1, "train_base": True},
        "phase2": {"epochs": 1},
        "evaluate": {"bootstrap": 50, "error_examples": 3},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    lines = []
    for name, values in base.items():
        lines.append(f"[{name}]")
        for key, value in values.items():
            text = f'"{value}"' if isinstance(value, str) else str(value).lower() if isinstance(
                value, bool) else repr(value)
            lines.append(f"{key} = {text}")
    path.write_text("\n".join(lines) + "\n")
    return path

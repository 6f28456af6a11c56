"""COVID-19 Radiography Database (Kaggle): one folder per class, each with images/.

Label rule: Normal -> none; COVID, Lung_Opacity, Viral Pneumonia -> opacity. The database has
no patient identifiers, so every image is its own group.
"""

from __future__ import annotations

from pathlib import Path

from training.records import Label, LayoutError, Record, SourceScan

SOURCE = "radiography"
CLASSES = {
    "COVID": Label.OPACITY,
    "Lung_Opacity": Label.OPACITY,
    "Normal": Label.NONE,
    "Viral Pneumonia": Label.OPACITY,
}
SUFFIXES = (".png", ".jpg", ".jpeg")


def scan(root: Path) -> SourceScan:
    if not root.is_dir():
        raise LayoutError(f"expected the COVID-19 Radiography Database folder {root}")
    records: list[Record] = []
    notes: list[str] = []
    for folder, label in CLASSES.items():
        images = root / folder / "images"
        if not images.is_dir():
            # Early releases kept the images directly in the class folder.
            if (root / folder).is_dir() and any((root / folder).glob("*.png")):
                images = root / folder
                notes.append(f"{folder}: images directly in the class folder (early release layout)")
            else:
                raise LayoutError(f"expected the folder {images} (class {folder!r})")
        if not (root / f"{folder}.metadata.xlsx").is_file():
            notes.append(f"{folder}.metadata.xlsx is missing (not needed for labels)")
        for path in sorted(images.iterdir()):
            if path.suffix.lower() in SUFFIXES:
                image_id = f"{SOURCE}:{path.stem}"
                records.append(Record(image_id, str(path), SOURCE, folder, label, group=image_id))
    notes.append("no patient identifiers in this database: each image is its own group, so two "
                 "images of one patient can fall on both sides of a split (near-duplicate "
                 "detection catches copies of one image, not other images of the same patient)")
    return SourceScan(SOURCE, records, [], notes)

"""A labels CSV plus an image folder: the generic layout (and ../shared/data/labelled).

Columns: ``file`` (relative to the image folder) and ``label`` (none|opacity) are required;
``source``, ``patient_id`` (the group; default: the file) and ``fold`` (an integer for
predefined patient-level splits) are used when present. Other columns are ignored.
"""

from __future__ import annotations

from pathlib import Path

from training.records import Label, LayoutError, Problem, Record, SourceScan, read_csv

SOURCE = "labelled"


def scan(csv_path: Path, images: Path | None = None) -> SourceScan:
    rows = read_csv(csv_path)
    if not rows:
        raise LayoutError(f"{csv_path} has no rows")
    if not {"file", "label"} <= set(rows[0]):
        raise LayoutError(f"{csv_path} must have the columns file and label (has {', '.join(rows[0])})")
    folder = images or csv_path.parent
    records: list[Record] = []
    problems: list[Problem] = []
    for number, row in enumerate(rows, start=2):
        source = row.get("source") or SOURCE
        file = row["file"]
        try:
            label = Label(row["label"].strip().lower())
        except ValueError:
            problems.append(Problem(file, "", source, "bad_label",
                                    f"line {number}: label {row['label']!r} is not none|opacity"))
            continue
        path = folder / file
        if not path.is_file():
            problems.append(Problem(file, str(path), source, "missing", f"line {number}: no such file"))
            continue
        fold_text = (row.get("fold") or "").strip()
        try:
            fold = int(fold_text) if fold_text else -1
        except ValueError as e:
            raise LayoutError(f"{csv_path} line {number}: fold {fold_text!r} is not an integer") from e
        records.append(Record(file, str(path), source, row["label"], label,
                              group=row.get("patient_id") or file, fold=fold))
    return SourceScan(SOURCE, records, problems, [])

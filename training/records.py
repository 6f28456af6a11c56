"""One labelled image, whatever dataset it came from, and the label rule's two classes."""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass, fields
from enum import StrEnum
from pathlib import Path


class Label(StrEnum):
    """The binary task; the order is the network's class order (model.network.CLASS_NAMES)."""

    NONE = "none"
    OPACITY = "opacity"


class Split(StrEnum):
    TRAIN = "train"
    VALID = "valid"
    TEST = "test"
    EXCLUDED = "excluded"


class LayoutError(ValueError):
    """A dataset is not laid out as expected; the message names the file or folder."""


@dataclass(frozen=True)
class Record:
    image_id: str
    path: str
    source: str
    original_label: str
    label: Label
    group: str
    """Patient (or, where the data has no patients, study or image): never on both sides of
    a split."""
    fold: int = -1
    study: str = ""


@dataclass(frozen=True)
class Problem:
    """An image that is listed but missing, unreadable or a duplicate: reported, not fatal."""

    image_id: str
    path: str
    source: str
    problem: str
    detail: str


@dataclass
class SourceScan:
    """What one dataset adapter found."""

    name: str
    records: list[Record]
    problems: list[Problem]
    notes: list[str]


def write_rows(path: Path, rows: list[dict[str, object]], columns: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def write_problems(path: Path, problems: list[Problem]) -> None:
    write_rows(path, [asdict(p) for p in problems], [f.name for f in fields(Problem)])


def read_csv(path: Path) -> list[dict[str, str]]:
    try:
        with path.open(newline="") as fh:
            return list(csv.DictReader(fh))
    except FileNotFoundError as e:
        raise LayoutError(f"expected the file {path}") from e

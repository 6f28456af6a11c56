"""The prepared data as batches: the manifest rows, the cached equalised images, and a
Keras PyDataset that augments (training) and applies model/'s network scaling."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from model.network import CLASS_NAMES
from model.preprocess import network_input
from training.augment import augment
from training.records import Label, Split
from training.splits import source_matches


@dataclass(frozen=True)
class Row:
    image_id: str
    path: str
    source: str
    label: Label
    split: Split
    cache_index: int

    @property
    def target(self) -> int:
        return CLASS_NAMES.index(self.label.value)


def load_rows(manifest: Path) -> list[Row]:
    with manifest.open(newline="") as fh:
        return [Row(r["image_id"], r["path"], r["source"], Label(r["label"]), Split(r["split"]),
                    int(r["cache_index"])) for r in csv.DictReader(fh)]


def select(rows: Sequence[Row], split: Split, sources: Sequence[str] = ()) -> list[Row]:
    return [r for r in rows if r.split is split and source_matches(r.source, sources)]


def open_cache(path: Path) -> np.ndarray:
    return np.load(path, mmap_mode="r")


def inputs(cache: np.ndarray, rows: Sequence[Row]) -> np.ndarray:
    """Network inputs (n, size, size, 3) for ``rows``, exactly as the daemon builds them."""
    return network_input(cache[[r.cache_index for r in rows]])


class Batches(keras.utils.PyDataset):  # type: ignore[misc]
    """Shuffled (per epoch, seeded) batches of (inputs, one-hot targets), augmented if asked."""

    def __init__(self, cache: np.ndarray, rows: Sequence[Row], batch_size: int,
                 augmenter: keras.Sequential | None = None, seed: int = 0,
                 max_batches: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.cache, self.rows, self.batch_size = cache, list(rows), batch_size
        self.augmenter, self.rng = augmenter, np.random.default_rng(seed)
        self.max_batches = max_batches
        self.order = np.arange(len(self.rows))
        if augmenter is not None:
            self.rng.shuffle(self.order)

    def __len__(self) -> int:
        batches = -(-len(self.rows) // self.batch_size)
        return min(batches, self.max_batches) if self.max_batches else batches

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        chosen = [self.rows[i] for i in self.order[index * self.batch_size:(index + 1) * self.batch_size]]
        equalized = self.cache[[r.cache_index for r in chosen]]
        if self.augmenter is not None:
            equalized = augment(self.augmenter, equalized)
        targets = np.eye(len(CLASS_NAMES), dtype=np.float32)[[r.target for r in chosen]]
        return network_input(equalized), targets

    def on_epoch_end(self) -> None:
        if self.augmenter is not None:
            self.rng.shuffle(self.order)

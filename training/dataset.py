"""The prepared data as batches: the manifest rows, the cached equalised images, and a
Keras PyDataset that augments (training) and applies model/'s network scaling.

The hot path has no per-image Python: a batch is one fancy index into the memory-mapped cache,
one augmentation call on the whole batch (seeded per batch, so ``workers`` threads can prepare
batches ahead of the training step) and one vectorised scaling."""

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
    group: str = ""
    """The patient (or study, or image) whose images move together; bootstrap clusters."""
    phase2_split: Split | None = None
    """Phase 2's split of this image when it differs from ``split`` (the "thesis" strategy)."""

    @property
    def target(self) -> int:
        return CLASS_NAMES.index(self.label.value)

    def split_in(self, phase: int) -> Split:
        return self.phase2_split if phase == 2 and self.phase2_split is not None else self.split


def load_rows(manifest: Path) -> list[Row]:
    """The manifest's rows (manifests written before ``phase2_split`` existed read as before)."""
    with manifest.open(newline="") as fh:
        return [Row(r["image_id"], r["path"], r["source"], Label(r["label"]), Split(r["split"]),
                    int(r["cache_index"]), r.get("group") or r["image_id"],
                    Split(r["phase2_split"]) if r.get("phase2_split") else None)
                for r in csv.DictReader(fh)]


def select(rows: Sequence[Row], split: Split, sources: Sequence[str] = (), phase: int = 1) -> list[Row]:
    """The rows in ``split`` for ``phase`` (phase 2 may split differently), from ``sources``."""
    return [r for r in rows if r.split_in(phase) is split and source_matches(r.source, sources)]


def open_cache(path: Path) -> np.ndarray:
    return np.load(path, mmap_mode="r")


def inputs(cache: np.ndarray, rows: Sequence[Row]) -> np.ndarray:
    """Network inputs (n, size, size, 3) for ``rows``, exactly as the daemon builds them."""
    return network_input(cache[[r.cache_index for r in rows]])


class Batches(keras.utils.PyDataset):  # type: ignore[misc]
    """Shuffled (per epoch, seeded) batches of (inputs, one-hot targets), augmented if asked.

    Batch ``i`` of epoch ``e`` depends only on (seed, e, i), so with ``workers`` > 1 (threads,
    Keras's prefetching enqueuer, ``max_queue_size`` batches ahead) the batches are the same as
    with one worker."""

    def __init__(self, cache: np.ndarray, rows: Sequence[Row], batch_size: int,
                 augmenter: keras.Sequential | None = None, seed: int = 0,
                 max_batches: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.cache, self.batch_size = cache, batch_size
        self.indices = np.array([r.cache_index for r in rows], dtype=np.int64)
        self.targets = np.eye(len(CLASS_NAMES), dtype=np.float32)[[r.target for r in rows]]
        self.augmenter, self.seed, self.epoch = augmenter, seed, 0
        self.max_batches = max_batches
        self.order = self._order()

    def _order(self) -> np.ndarray:
        if self.augmenter is None:
            return np.arange(len(self.indices))
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.indices))

    def __len__(self) -> int:
        batches = -(-len(self.indices) // self.batch_size)
        return min(batches, self.max_batches) if self.max_batches else batches

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        chosen = self.order[index * self.batch_size:(index + 1) * self.batch_size]
        equalized = np.asarray(self.cache[self.indices[chosen]])
        if self.augmenter is not None:
            batch_seed = int(np.random.default_rng([self.seed, self.epoch, index]).integers(2**26))
            equalized = augment(self.augmenter, equalized, batch_seed)
        return network_input(equalized), self.targets[chosen]

    def on_epoch_end(self) -> None:
        self.epoch += 1
        self.order = self._order()

"""Seeded, stratified, grouped splits: no study/patient on two sides, class balance kept."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from training.config import SplitConfig
from training.records import Record, Split


def source_matches(source: str, patterns: Sequence[str]) -> bool:
    """Empty ``patterns`` match everything; otherwise a case-insensitive substring match."""
    return not patterns or any(p.lower() in source.lower() for p in patterns)


def _holdout(records: Sequence[Record], indices: list[int], fraction: float, seed: int) -> set[int]:
    """One fold of a stratified group k-fold with k = 1 / fraction: about ``fraction`` held out."""
    n_splits = max(2, round(1.0 / fraction))
    groups = [records[i].group for i in indices]
    if len(set(groups)) < n_splits:
        raise ValueError(f"only {len(set(groups))} groups: too few to hold out {fraction:.0%}")
    labels = [records[i].label.value for i in indices]
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    _, held = next(folds.split(np.zeros(len(indices)), labels, groups))
    return {indices[i] for i in held}


def assign_splits(records: Sequence[Record], config: SplitConfig) -> list[Split]:
    """The split of each record. Predefined folds win when ``test_fold`` is set."""
    splits = [Split.TRAIN] * len(records)
    pool = list(range(len(records)))
    if config.test_fold >= 0:
        for i, record in enumerate(records):
            if record.fold == config.test_fold:
                splits[i] = Split.TEST
            elif record.fold == config.valid_fold and config.valid_fold >= 0:
                splits[i] = Split.VALID
        if config.valid_fold >= 0:
            return splits
        pool = [i for i in pool if splits[i] is Split.TRAIN]
    else:
        candidates = [i for i in pool if source_matches(records[i].source, config.test_sources)]
        if not candidates:
            raise ValueError(f"no images from split.test_sources {list(config.test_sources)}")
        for i in _holdout(records, candidates, config.test_fraction, config.seed):
            splits[i] = Split.TEST
        pool = [i for i in pool if splits[i] is Split.TRAIN]
    for i in _holdout(records, pool, config.valid_fraction, config.seed + 1):
        splits[i] = Split.VALID
    return splits

"""Seeded splits, by one of two strategies (``split.strategy``):

- ``grouped`` (the default): the final test is a stratified, grouped hold-out of
  ``test_sources``; the rest of all data is split train/valid the same way. No patient, study
  or near-duplicate cluster is on two sides.
- ``thesis``: the thesis's order and validation cut, for comparison runs. The same final test;
  then the remaining images in the thesis's dataframe order, competition images first, and
  the first ``valid_fraction`` of them is the validation split, as Keras's ImageDataGenerator
  took it with ``validation_split=0.2``: on the full data, all 5,067 competition
  training images plus 179 external ones, so phase 1 trains on external data only. Groups cut
  by that boundary move to the validation side whole. Phase 2 (competition data only) cannot
  train on its validation split, and the thesis validated it on the final test set, which is
  never done here: the phase-2 sources' images are split again, grouped and stratified,
  ``valid_fraction`` for phase 2's validation (``phase2_split``).

Predefined folds (``test_fold`` / ``valid_fold``) override both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from training.config import SplitConfig
from training.records import Record, Split

STRATEGIES = ("grouped", "thesis")


@dataclass(frozen=True)
class Assignment:
    splits: list[Split]
    phase2_splits: list[Split | None]
    """Phase 2's split where it differs from ``splits`` (the thesis strategy), else None."""
    moved_to_valid: int = 0
    """Thesis strategy: images moved across its validation cut to keep their group whole."""


def source_matches(source: str, patterns: Sequence[str]) -> bool:
    """Empty ``patterns`` match everything; otherwise a case-insensitive substring match."""
    return not patterns or any(p.lower() in source.lower() for p in patterns)


def _holdout(records: Sequence[Record], groups: Sequence[str], indices: list[int], fraction: float,
             seed: int) -> set[int]:
    """One fold of a stratified group k-fold with k = 1 / fraction: about ``fraction`` held out."""
    n_splits = max(2, round(1.0 / fraction))
    chosen_groups = [groups[i] for i in indices]
    if len(set(chosen_groups)) < n_splits:
        raise ValueError(f"only {len(set(chosen_groups))} groups: too few to hold out {fraction:.0%}")
    labels = [records[i].label.value for i in indices]
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    _, held = next(folds.split(np.zeros(len(indices)), labels, chosen_groups))
    return {indices[i] for i in held}


def _thesis_valid(records: Sequence[Record], groups: Sequence[str], pool: list[int],
                  config: SplitConfig) -> tuple[set[int], int]:
    """The first ``valid_fraction`` of the pool in the thesis's order (test sources first, each
    source in its dataset order), widened to whole groups; and how many images that moved."""
    ordered = ([i for i in pool if source_matches(records[i].source, config.test_sources)]
               + [i for i in pool if not source_matches(records[i].source, config.test_sources)])
    cut = set(ordered[:int(len(ordered) * config.valid_fraction)])
    cut_groups = {groups[i] for i in cut}
    valid = {i for i in pool if groups[i] in cut_groups}
    return valid, len(valid) - len(cut)


def assign_splits(records: Sequence[Record], config: SplitConfig,
                  groups: Sequence[str] | None = None,
                  phase2_sources: Sequence[str] = ()) -> Assignment:
    """The split of each record. ``groups`` (default: each record's group) are what must stay
    on one side: patients or studies, merged with near-duplicate clusters. ``phase2_sources``:
    the sources phase 2 trains on (the thesis strategy splits them again for phase 2)."""
    groups = list(groups) if groups is not None else [r.group for r in records]
    splits = [Split.TRAIN] * len(records)
    phase2: list[Split | None] = [None] * len(records)
    pool = list(range(len(records)))
    if config.test_fold >= 0:
        for i, record in enumerate(records):
            if record.fold == config.test_fold:
                splits[i] = Split.TEST
            elif record.fold == config.valid_fold and config.valid_fold >= 0:
                splits[i] = Split.VALID
        if config.valid_fold >= 0:
            return Assignment(splits, phase2)
        pool = [i for i in pool if splits[i] is Split.TRAIN]
    else:
        candidates = [i for i in pool if source_matches(records[i].source, config.test_sources)]
        if not candidates:
            raise ValueError(f"no images from split.test_sources {list(config.test_sources)}")
        for i in _holdout(records, groups, candidates, config.test_fraction, config.seed):
            splits[i] = Split.TEST
        pool = [i for i in pool if splits[i] is Split.TRAIN]
    if config.strategy == "thesis" and config.test_fold < 0:
        valid, moved = _thesis_valid(records, groups, pool, config)
        for i in valid:
            splits[i] = Split.VALID
        second = [i for i in pool if source_matches(records[i].source, phase2_sources)]
        if second:
            held = _holdout(records, groups, second, config.valid_fraction, config.seed + 2)
            for i in second:
                phase2[i] = Split.VALID if i in held else Split.TRAIN
        return Assignment(splits, phase2, moved)
    for i in _holdout(records, groups, pool, config.valid_fraction, config.seed + 1):
        splits[i] = Split.VALID
    return Assignment(splits, phase2)

"""`prepare`: read the datasets, drop duplicates and unreadable files, cache the equalised
images, split, and write the data manifest, summary and problem report into the run folder."""

from __future__ import annotations

import multiprocessing
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from model.errors import PreprocessError
from model.manifest import sha256_file
from model.preprocess import PreprocessSpec, preprocess
from training.config import Config
from training.near_duplicates import NearDuplicate, clusters, find
from training.records import (
    Label,
    LayoutError,
    Problem,
    Record,
    SourceScan,
    Split,
    write_problems,
    write_rows,
)
from training.run import RunPaths
from training.sources import labelled, radiography, siim
from training.splits import assign_splits

MANIFEST_COLUMNS = ["image_id", "path", "source", "original_label", "label", "group", "study", "fold",
                    "sha256", "cluster", "split", "phase2_split", "cache_index"]


@dataclass(frozen=True)
class Prepared:
    records: list[Record]
    splits: list[Split]
    problems: list[Problem]
    notes: list[str]


def preprocess_spec(config: Config) -> PreprocessSpec:
    return PreprocessSpec(input_size=config.model.input_size, aspect=config.model.aspect)  # type: ignore[arg-type]


def scan_sources(config: Config) -> list[SourceScan]:
    scans: list[SourceScan] = []
    data = config.data
    if data.siim:
        scans.append(siim.scan(Path(data.siim),
                               metadata=Path(data.siim_metadata) if data.siim_metadata else None))
    if data.radiography:
        scans.append(radiography.scan(Path(data.radiography)))
    if data.labelled_csv:
        images = Path(data.labelled_images) if data.labelled_images else None
        scans.append(labelled.scan(Path(data.labelled_csv), images))
    return scans


def _sha256(path: str) -> str:
    return sha256_file(Path(path))


def _equalize(job: tuple[str, PreprocessSpec]) -> np.ndarray | str:
    path, spec = job
    try:
        return preprocess(path, spec).equalized
    except PreprocessError as e:
        return f"{e.reason.value}: {e.detail}"


def _workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def deduplicate(records: list[Record]) -> tuple[list[Record], list[str], list[Problem]]:
    """Identical files (by sha256) are kept once; every dropped copy is reported."""
    with ProcessPoolExecutor(_workers(), mp_context=multiprocessing.get_context("fork")) as pool:
        hashes = list(tqdm(pool.map(_sha256, [r.path for r in records], chunksize=16),
                           total=len(records), desc="hashing", unit="img"))
    first: dict[str, Record] = {}
    kept: list[Record] = []
    kept_hashes: list[str] = []
    problems: list[Problem] = []
    for record, digest in zip(records, hashes, strict=True):
        if digest in first:
            other = first[digest]
            conflict = " with a different label" if other.label is not record.label else ""
            problems.append(Problem(record.image_id, record.path, record.source, "duplicate",
                                    f"same bytes as {other.image_id} ({other.source}){conflict}"))
            continue
        first[digest] = record
        kept.append(record)
        kept_hashes.append(digest)
    return kept, kept_hashes, problems


def cache_images(records: list[Record], spec: PreprocessSpec, cache: Path) -> list[str | None]:
    """Preprocess every image once into ``cache``; returns an error per record (None: cached)."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    size = spec.input_size
    array = np.lib.format.open_memmap(cache, mode="w+", dtype=np.float32, shape=(len(records), size, size))
    errors: list[str | None] = []
    with ProcessPoolExecutor(_workers(), mp_context=multiprocessing.get_context("fork")) as pool:
        results = pool.map(_equalize, [(r.path, spec) for r in records], chunksize=4)
        for i, result in enumerate(tqdm(results, total=len(records), desc="preprocessing", unit="img")):
            if isinstance(result, str):
                errors.append(result)
            else:
                array[i] = result
                errors.append(None)
    array.flush()
    del array
    return errors


def summary_rows(records: list[Record], splits: list[Split]) -> list[dict[str, object]]:
    """Counts per source and label (the thesis's 56 % opacity / 44 % none on the full data)."""
    rows: list[dict[str, object]] = []
    kept = [(r, s) for r, s in zip(records, splits, strict=True) if s is not Split.EXCLUDED]
    for source in sorted({r.source for r, _ in kept}) + ["ALL"]:
        chosen = [(r, s) for r, s in kept if source in ("ALL", r.source)]
        count = Counter(r.label for r, _ in chosen)
        total = len(chosen)
        by_split = Counter(s for _, s in chosen)
        rows.append({
            "source": source, "images": total,
            "none": count[Label.NONE], "opacity": count[Label.OPACITY],
            "opacity_percent": round(100.0 * count[Label.OPACITY] / total, 1) if total else 0.0,
            "train": by_split[Split.TRAIN], "valid": by_split[Split.VALID], "test": by_split[Split.TEST],
        })
    return rows


def near_duplicates(config: Config, records: list[Record], cache: Path,
                    usable: list[int]) -> tuple[list[NearDuplicate], list[Problem], list[str]]:
    """Confirmed near-duplicate pairs among the usable images, a problem row per pair (both
    paths, hash distance, correlation) and a note with the counts."""
    if config.data.near_duplicate_distance < 0:
        return [], [], ["near-duplicate search: off (data.near_duplicate_distance = -1)"]
    pairs = find(np.load(cache, mmap_mode="r"), usable, config.data.near_duplicate_distance,
                 config.data.near_duplicate_correlation)
    problems = []
    for pair in pairs:
        a, b = records[pair.first], records[pair.second]
        problems.append(Problem(b.image_id, b.path, b.source, "near_duplicate",
                                f"looks like {a.image_id} ({a.source}, {a.path}): hash distance "
                                f"{pair.distance}, correlation {pair.correlation:.4f}"))
    across = sum(1 for p in pairs if records[p.first].source != records[p.second].source)
    note = (f"near-duplicates: {len(pairs)} pairs ({across} across sources) at hash distance <= "
            f"{config.data.near_duplicate_distance} and correlation >= "
            f"{config.data.near_duplicate_correlation}; each cluster is kept on one side of every split")
    return pairs, problems, [note]


def split_groups(records: list[Record], cluster_of: list[int]) -> list[str]:
    """Each record's group merged with its near-duplicate cluster: what must stay together."""
    parent: dict[str, str] = {}

    def root(g: str) -> str:
        while parent.get(g, g) != g:
            g = parent[g]
        return g

    for i, c in enumerate(cluster_of):
        if c != i:
            a, b = root(records[i].group), root(records[c].group)
            if a != b:
                parent[max(a, b)] = min(a, b)
    return [root(r.group) for r in records]


def keep_clusters_apart(records: list[Record], splits: list[Split], cluster_of: list[int],
                        problems: list[Problem]) -> None:
    """Predefined folds cannot move an image: a cluster on several sides keeps its most
    held-out members (test, then valid) and the others are excluded, each one listed."""
    rank = {Split.TEST: 0, Split.VALID: 1, Split.TRAIN: 2}
    best: dict[int, Split] = {}
    for i, split in enumerate(splits):
        if split in rank and rank[split] < rank[best.get(cluster_of[i], Split.TRAIN)]:
            best[cluster_of[i]] = split
    for i, split in enumerate(splits):
        held = best.get(cluster_of[i])
        if held is not None and split in rank and split is not held:
            splits[i] = Split.EXCLUDED
            problems.append(Problem(records[i].image_id, records[i].path, records[i].source,
                                    "near_duplicate_excluded",
                                    f"a near-duplicate is in the {held.value} split; "
                                    f"not used for {split.value}"))


def prepare(config: Config, paths: RunPaths) -> Prepared:
    scans = scan_sources(config)
    records = [r for scan in scans for r in scan.records]
    problems = [p for scan in scans for p in scan.problems]
    notes = [f"{scan.name}: {note}" for scan in scans for note in scan.notes]
    listed = len(records) + sum(1 for p in problems if p.problem == "missing")
    if not records:
        raise LayoutError("the configured datasets hold no images")
    records, hashes, duplicates = deduplicate(records)
    problems += duplicates
    errors = cache_images(records, preprocess_spec(config), paths.cache)
    for record, error in zip(records, errors, strict=True):
        if error is not None:
            problems.append(Problem(record.image_id, record.path, record.source, "unreadable", error))
    bad = sum(1 for p in problems if p.problem in ("missing", "unreadable"))
    fraction = bad / max(1, listed)
    if fraction > config.data.max_missing_fraction:
        write_problems(paths.problems, problems)
        raise LayoutError(f"{bad} of {listed} images are missing or unreadable ({fraction:.1%} > "
                          f"data.max_missing_fraction {config.data.max_missing_fraction:.1%}); "
                          f"see {paths.problems}")
    usable = [i for i, e in enumerate(errors) if e is None]
    pairs, duplicate_problems, duplicate_notes = near_duplicates(config, records, paths.cache, usable)
    problems += duplicate_problems
    notes += duplicate_notes
    cluster_of = clusters(len(records), pairs)
    groups = split_groups(records, cluster_of)
    assignment = assign_splits([records[i] for i in usable], config.split, [groups[i] for i in usable],
                               config.phase2.sources)
    splits = [Split.EXCLUDED] * len(records)
    phase2: list[Split | None] = [None] * len(records)
    for k, i in enumerate(usable):
        splits[i], phase2[i] = assignment.splits[k], assignment.phase2_splits[k]
    keep_clusters_apart(records, splits, cluster_of, problems)
    if assignment.moved_to_valid:
        notes.append(f"thesis split: {assignment.moved_to_valid} images moved across the validation "
                     "cut to keep their patient or near-duplicate cluster whole")
    write_problems(paths.problems, problems)
    cluster_sizes = Counter(cluster_of)
    rows = []
    for i, (record, split) in enumerate(zip(records, splits, strict=True)):
        row = asdict(record)
        second = phase2[i]
        row.update(label=record.label.value, sha256=hashes[i], split=split.value,
                   phase2_split=second.value if second is not None and split is not Split.EXCLUDED else "",
                   cluster=cluster_of[i] if cluster_sizes[cluster_of[i]] > 1 else "",
                   cache_index=i)
        rows.append(row)
    write_rows(paths.manifest, rows, MANIFEST_COLUMNS)
    write_rows(paths.summary, summary_rows(records, splits),
               ["source", "images", "none", "opacity", "opacity_percent", "train", "valid", "test"])
    paths.notes.write_text("".join(f"{n}\n" for n in notes))
    return Prepared(records, splits, problems, notes)

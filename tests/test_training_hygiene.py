"""training/: patients, near-duplicates across sources and the two split strategies."""

from __future__ import annotations

import csv
import shutil
from collections import defaultdict
from pathlib import Path

import pytest

from tests.training_data import TinyData, make_tiny_data, write_training_config
from training.cli import main as train_main
from training.config import load_config
from training.dataset import load_rows, select
from training.records import Label, Record, Split
from training.sources import siim
from training.splits import assign_splits


def _manifest(run: Path) -> list[dict[str, str]]:
    with (run / "data" / "manifest.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def _problems(run: Path) -> list[dict[str, str]]:
    with (run / "data" / "problems.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TinyData]:
    root = tmp_path_factory.mktemp("planted")
    data = make_tiny_data(root, near_duplicates=True)
    run = root / "run"
    config = write_training_config(root / "t.toml", data)
    assert train_main(["prepare", "--config", str(config), "--run", str(run)]) == 0
    return run, data


def test_reencoded_resized_and_shifted_copies_are_found_and_listed_with_both_paths(
        planted: tuple[Path, TinyData]) -> None:
    run, data = planted
    by_id = {r["image_id"]: r for r in _manifest(run)}
    found = [p for p in _problems(run) if p["problem"] == "near_duplicate"]
    original = by_id["i0040"]
    for copy, of in data.near_duplicates.items():
        row = next((p for p in found if p["image_id"] == copy and f"looks like {of} " in p["detail"]), None)
        assert row is not None, f"{copy} not found as a copy of {of}: {found}"
        assert row["path"] == by_id[copy]["path"] and original["path"] in row["detail"]
        assert "hash distance" in row["detail"] and "correlation" in row["detail"]
    # Only the planted images: the other radiographs of the tiny data are all different.
    involved = {p["image_id"] for p in found} | {p["detail"].split()[2] for p in found}
    assert involved == {"i0040", *data.near_duplicates}
    assert len({by_id[i]["cluster"] for i in involved}) == 1 and original["cluster"] != ""
    notes = (run / "data" / "notes.txt").read_text()
    assert "near-duplicates: 6 pairs (3 across sources)" in notes


def test_each_near_duplicate_cluster_and_patient_is_on_one_side_of_every_split(
        planted: tuple[Path, TinyData]) -> None:
    run, data = planted
    rows = _manifest(run)
    for key in ("cluster", "group"):
        sides: dict[str, set[str]] = defaultdict(set)
        for row in rows:
            if row[key] and row["split"] != "excluded":
                sides[row[key]].add(row["split"])
        assert all(len(s) == 1 for s in sides.values()), (key, sides)
    # Studies 2 and 3 belong to one patient: one group, one side.
    two_studies = [r for r in rows if r["study"] in ("s002", "s003")]
    assert len({r["group"] for r in two_studies}) == 1 and len({r["split"] for r in two_studies}) == 1
    notes = (run / "data" / "notes.txt").read_text()
    assert "siim: patients: 19 (PatientID from 22 DICOM headers" in notes
    assert "siim: patients with more than one study: 1" in notes
    assert "radiography: no patient identifiers in this database" in notes
    assert all("PAT0" not in r["group"] for r in rows)  # hashed, never the header's value


def test_a_copy_of_a_test_image_is_never_trained_on(tmp_path: Path) -> None:
    """The final test comes from SIIM only, so a copy in another source cannot join it: it is
    excluded and listed. Seeds are tried until the original lands in the test split."""
    data = make_tiny_data(tmp_path, near_duplicates=True)
    for seed in range(1, 40):
        run = tmp_path / f"run{seed}"
        config = write_training_config(tmp_path / f"t{seed}.toml", data, split={"seed": seed})
        assert train_main(["prepare", "--config", str(config), "--run", str(run)]) == 0
        by_id = {r["image_id"]: r for r in _manifest(run)}
        if by_id["i0040"]["split"] == "test":
            break
    else:
        pytest.fail("i0040 never landed in the test split")
    for copy in data.near_duplicates:
        assert by_id[copy]["split"] == "excluded"
    excluded = {p["image_id"] for p in _problems(run) if p["problem"] == "near_duplicate_excluded"}
    assert excluded == set(data.near_duplicates)


def test_siim_patients_come_from_a_metadata_file_for_resized_copies(tmp_path: Path) -> None:
    data = make_tiny_data(tmp_path)
    resized = tmp_path / "resized"
    (resized / "train").mkdir(parents=True)
    for name in ("train_study_level.csv", "train_image_level.csv"):
        shutil.copy(data.siim / name, resized / name)
    for dcm in (data.siim / "train").rglob("*.dcm"):
        (resized / "train" / f"{dcm.stem}.png").write_bytes(b"png bytes are not read by scan")
    metadata = resized / "meta.csv"
    with metadata.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image_id", "PatientID"])
        for image, study in data.study_of_image.items():
            if study not in ("s000", "s001"):
                writer.writerow([image, data.patient_of_study[study]])
    scan = siim.scan(resized, metadata=metadata)
    groups = {r.image_id: r.group for r in scan.records}
    assert groups["i0000"] == "study:s000" and groups["i0010"] == "study:s001"
    assert groups["i0020"] == groups["i0030"] and groups["i0020"].startswith("patient:")
    assert "patients with more than one study: 1" in scan.notes
    assert any("3 images grouped by study instead" in n for n in scan.notes), scan.notes


def _records(competition: int, external: int) -> list[Record]:
    out = [Record(f"c{i}", "", "siim", "", Label.OPACITY if i % 3 else Label.NONE, group=f"p{i // 2}")
           for i in range(competition)]
    out += [Record(f"e{i}", "", "radiography", "", Label.OPACITY if i % 2 else Label.NONE, group=f"e{i}")
            for i in range(external)]
    return out


def test_thesis_strategy_validates_phase_1_on_the_competition_images_first() -> None:
    records = _records(40, 160)
    config = load_config(None, {"data": {"siim": "x"}, "split": {"strategy": "thesis"}}).split
    result = assign_splits(records, config, phase2_sources=("siim",))
    test = {i for i, s in enumerate(result.splits) if s is Split.TEST}
    assert test and all(records[i].source == "siim" for i in test)
    pool = [i for i in range(len(records)) if i not in test]
    valid = [i for i in pool if result.splits[i] is Split.VALID]
    # Every remaining competition image comes first, so all of them validate phase 1, and the
    # cut (20 % of the pool) takes the first external images after them.
    competition_left = [i for i in pool if records[i].source == "siim"]
    assert set(competition_left) <= set(valid)
    assert len(valid) == int(len(pool) * 0.2) + result.moved_to_valid
    external_valid = sorted(i for i in valid if records[i].source == "radiography")
    assert external_valid == list(range(40, 40 + len(external_valid)))
    # Phase 2 (competition only) gets its own validation split, never the final test.
    phase2 = {i: result.phase2_splits[i] for i in competition_left}
    assert set(phase2.values()) == {Split.TRAIN, Split.VALID}
    assert all(result.phase2_splits[i] is None for i in test)
    groups: dict[str, set[Split | None]] = defaultdict(set)
    for i in competition_left:
        groups[records[i].group].add(phase2[i])
    assert all(len(s) == 1 for s in groups.values())


def test_thesis_strategy_moves_a_group_cut_by_its_boundary_to_the_validation_side() -> None:
    from training.splits import _thesis_valid

    records = _records(0, 50)
    records[10] = Record("e10", "", "radiography", "", Label.NONE, group="e9")  # e9's patient
    config = load_config(None, {"data": {"siim": "x"}, "split": {"strategy": "thesis"}}).split
    valid, moved = _thesis_valid(records, [r.group for r in records], list(range(50)), config)
    assert valid == set(range(11)) and moved == 1  # the cut is the first 10; e10 follows e9


def test_a_thesis_prepared_run_never_validates_phase_2_on_the_test_split(tmp_path: Path) -> None:
    data = make_tiny_data(tmp_path)
    config = write_training_config(tmp_path / "t.toml", data, split={"strategy": "thesis"})
    run = tmp_path / "run"
    assert train_main(["prepare", "--config", str(config), "--run", str(run)]) == 0
    rows = load_rows(run / "data" / "manifest.csv")
    valid1, valid2 = select(rows, Split.VALID, phase=1), select(rows, Split.VALID, ("siim",), phase=2)
    train2 = select(rows, Split.TRAIN, ("siim",), phase=2)
    test = {r.image_id for r in select(rows, Split.TEST)}
    assert valid2 and train2 and not test & {r.image_id for r in valid1 + valid2 + train2}
    assert [r.source for r in valid1][:1] == ["siim"]

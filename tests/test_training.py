"""training/: prepare on tiny datasets in the Kaggle layouts and on the real labelled set,
then the whole chain prepare -> fit -> evaluate -> export -> the daemon's predictor."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from tests.training_data import make_tiny_data, write_training_config
from training.cli import EXIT_USAGE
from training.cli import main as train_main
from training.config import ConfigError, load_config
from training.metrics import at_threshold, threshold_for_sensitivity

LABELLED = Path(__file__).resolve().parents[2] / "shared" / "data" / "labelled" / "labels.csv"
REPO = Path(__file__).resolve().parents[1]


def _manifest(run: Path) -> list[dict[str, str]]:
    with (run / "data" / "manifest.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("tiny")
    data = make_tiny_data(root)
    config = write_training_config(root / "train.toml", data)
    run = root / "run"
    assert train_main(["prepare", "--config", str(config), "--run", str(run)]) == 0
    return run, data


def test_prepare_maps_labels_and_reports_problems(prepared: tuple[Path, object]) -> None:
    run, data = prepared
    rows = _manifest(run)
    by_id = {r["image_id"]: r for r in rows}
    siim = [r for r in rows if r["source"] == "siim"]
    radiography = [r for r in rows if r["source"] == "radiography"]
    assert len(siim) == 22 and len(radiography) == 16
    for row in siim:  # the study label wins, whatever the image label says
        assert row["label"] == data.study_label[data.study_of_image[row["image_id"]]]
    assert by_id[data.disagreeing_image]["label"] == "opacity"
    expected = {"COVID": "opacity", "Lung_Opacity": "opacity", "Viral Pneumonia": "opacity", "Normal": "none"}
    for row in radiography:
        assert row["label"] == expected[row["original_label"]]
    problems = list(csv.DictReader((run / "data" / "problems.csv").open()))
    kinds = sorted(p["problem"] for p in problems)
    assert kinds == ["duplicate", "missing"]
    duplicate = next(p for p in problems if p["problem"] == "duplicate")
    assert "different label" in duplicate["detail"]
    assert {"Normal-1", "Lung_Opacity-99"} == {duplicate["image_id"].split(":")[1],
                                               duplicate["detail"].split()[3].split(":")[1]}
    assert next(p for p in problems if p["problem"] == "missing")["image_id"] == data.missing_image
    notes = (run / "data" / "notes.txt").read_text()
    assert "image-level label 'none' in an opacity study: 1 images" in notes
    assert "image-level label 'opacity' in a negative study: 1 images" in notes
    assert "Viral Pneumonia.metadata.xlsx is missing" in notes
    summary = {r["source"]: r for r in csv.DictReader((run / "data" / "summary.csv").open())}
    assert summary["ALL"]["images"] == "38"
    assert int(summary["ALL"]["none"]) + int(summary["ALL"]["opacity"]) == 38
    cache = np.load(run / "data" / "equalized.npy", mmap_mode="r")
    assert cache.shape == (38, 71, 71) and 0.0 <= float(cache.min()) and float(cache.max()) <= 1.0


def test_splits_hold_out_competition_data_without_study_leakage(prepared: tuple[Path, object]) -> None:
    run, _ = prepared
    rows = _manifest(run)
    splits_of_group: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        splits_of_group[row["group"]].add(row["split"])
    assert all(len(s) == 1 for s in splits_of_group.values()), splits_of_group
    test = [r for r in rows if r["split"] == "test"]
    assert test and all(r["source"] == "siim" for r in test)
    siim_test_fraction = len(test) / sum(r["source"] == "siim" for r in rows)
    assert 0.1 <= siim_test_fraction <= 0.35
    assert {r["label"] for r in test} == {"none", "opacity"}  # stratified
    valid = [r for r in rows if r["split"] == "valid"]
    assert 0.1 <= len(valid) / (len(rows) - len(test)) <= 0.35
    # Seeded: the same configuration gives the same splits.
    again = run.parent / "again"
    assert train_main(["prepare", "--config", str(run.parent / "train.toml"), "--run", str(again)]) == 0
    assert [r["split"] for r in _manifest(again)] == [r["split"] for r in rows]


def test_layout_errors_name_what_was_expected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = make_tiny_data(tmp_path)
    import shutil

    shutil.rmtree(data.radiography / "Normal")
    config = write_training_config(tmp_path / "t.toml", data)
    assert train_main(["prepare", "--config", str(config), "--run", str(tmp_path / "r")]) == EXIT_USAGE
    assert f"expected the folder {data.radiography / 'Normal' / 'images'}" in capsys.readouterr().err
    (data.siim / "train_study_level.csv").unlink()
    config = write_training_config(tmp_path / "t2.toml", data, data={"radiography": ""})
    assert train_main(["prepare", "--config", str(config), "--run", str(tmp_path / "r2")]) == EXIT_USAGE
    assert f"expected the file {data.siim / 'train_study_level.csv'}" in capsys.readouterr().err


def test_too_many_missing_images_fail_with_the_report(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    data = make_tiny_data(tmp_path)
    (data.siim / "train" / "s002" / "series2" / "i0020.dcm").write_bytes(b"not a dicom file")
    config = write_training_config(tmp_path / "t.toml", data, data={"max_missing_fraction": 0.04})
    run = tmp_path / "run"
    assert train_main(["prepare", "--config", str(config), "--run", str(run)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "2 of 40 images are missing or unreadable" in err and "problems.csv" in err
    problems = (run / "data" / "problems.csv").read_text()
    assert "i0020" in problems and "unreadable" in problems and "not_readable" in problems
    assert not (run / "config.toml").exists()  # not a prepared run: fit would refuse it


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[phase1]\nepoch = 3\n")
    with pytest.raises(ConfigError, match="unknown key phase1.epoch"):
        load_config(bad)
    bad.write_text('[data]\nsiim = "x"\n[model]\ninput_size = "big"\n')
    with pytest.raises(ConfigError, match="model.input_size = 'big': expected int"):
        load_config(bad)
    bad.write_text("[split]\nseed = 1\n")
    with pytest.raises(ConfigError, match="no data"):
        load_config(bad)
    defaults = load_config(None, {"data": {"siim": "x"}})
    p1, p2 = defaults.phase1, defaults.phase2
    assert (p1.epochs, p1.learning_rate, p1.train_base) == (20, 1e-3, False)
    assert (p2.epochs, p2.learning_rate, p2.train_base) == (15, 0.01, True)
    assert defaults.augment.zoom == 0.1 and defaults.augment.brightness == (0.8, 1.1)


def test_thresholds_for_target_sensitivity() -> None:
    y = np.array([0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1])
    p = np.array([0.1, 0.5, 0.7, 0.2, 0.3, 0.4, 0.6, 0.65, 0.8, 0.85, 0.9, 0.95, 0.99])
    t90 = threshold_for_sensitivity(y, p, 0.90)
    assert t90 == 0.3 and at_threshold(y, p, t90)["sensitivity"] == 0.9
    assert threshold_for_sensitivity(y, p, 0.95) == 0.2
    result = at_threshold(y, p, 0.5)
    assert result["confusion_matrix"] == [[1, 2], [3, 7]]  # rows truth, none first


def test_augmentation_stays_in_range_and_is_seeded() -> None:
    from training.augment import augment, build_augmenter
    from training.config import AugmentConfig

    config = AugmentConfig(horizontal_flip=True, zoom=0.1, shear_degrees=0.05, brightness=(0.8, 1.1))
    images = np.random.default_rng(0).random((6, 40, 40)).astype(np.float32)
    augmenter = build_augmenter(config, 7)
    first = augment(augmenter, images, seed=11)
    second = augment(build_augmenter(config, 7), images, seed=11)
    assert first.shape == images.shape and first.dtype == np.float32
    assert 0.0 <= first.min() and first.max() <= 1.0
    np.testing.assert_allclose(first, second)
    assert not np.allclose(first, images)
    assert not np.allclose(first, augment(augmenter, images, seed=12))
    only_flip = AugmentConfig(horizontal_flip=True, zoom=0.0, shear_degrees=0.0, brightness=(1.0, 1.0))
    flipped = augment(build_augmenter(only_flip, 1), np.repeat(images[:1], 32, axis=0), seed=3)
    mirrored = sum(np.allclose(f, images[0][:, ::-1]) for f in flipped)
    assert 0 < mirrored < 32 and all(np.allclose(f, images[0]) or np.allclose(f, images[0][:, ::-1])
                                     for f in flipped)
    # Zoom draws height and width independently (ImageDataGenerator's zoom_range), not one factor.
    zoom = AugmentConfig(horizontal_flip=False, zoom=0.3, shear_degrees=0.0, brightness=(1.0, 1.0))
    layer = build_augmenter(zoom, 1).layers[0]
    import keras

    change = layer.get_random_transformation(images[..., None], training=True,
                                             seed=keras.random.SeedGenerator(5))
    heights, widths = (np.asarray(keras.ops.convert_to_numpy(change[k])) for k in
                       ("height_zoom", "width_zoom"))
    assert not np.allclose(heights, widths)


def test_batches_are_the_same_whatever_order_the_loader_threads_take_them_in() -> None:
    from training.augment import build_augmenter
    from training.config import AugmentConfig
    from training.dataset import Batches, Row
    from training.records import Label, Split

    cache = np.random.default_rng(1).random((10, 32, 32)).astype(np.float32)
    rows = [Row(str(i), "", "s", Label.OPACITY if i % 2 else Label.NONE, Split.TRAIN, i) for i in range(10)]
    augmenter = build_augmenter(AugmentConfig(True, 0.1, 0.05, (0.8, 1.1)), 3)
    one = Batches(cache, rows, 4, augmenter, seed=9)
    other = Batches(cache, rows, 4, augmenter, seed=9, workers=2, max_queue_size=4)
    backwards = [other[i] for i in reversed(range(len(other)))][::-1]
    for (x1, y1), (x2, y2) in zip([one[i] for i in range(len(one))], backwards, strict=True):
        np.testing.assert_allclose(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    one.on_epoch_end()
    assert not np.allclose(one[0][0][:2], other[0][0][:2])  # a new epoch: new order and draws
    assert sorted(np.concatenate([one[i][1][:, 1] for i in range(len(one))])) == [0.0] * 5 + [1.0] * 5


@pytest.mark.skipif(not LABELLED.is_file(), reason="../shared/data/labelled is not present")
def test_labelled_adapter_uses_the_patient_folds(tmp_path: Path) -> None:
    config = tmp_path / "labelled.toml"
    config.write_text(f'[data]\nlabelled_csv = "{LABELLED}"\n[split]\ntest_fold = 4\nvalid_fold = 3\n'
                      "[model]\ninput_size = 71\n")
    run = tmp_path / "run"
    assert train_main(["prepare", "--config", str(config), "--run", str(run)]) == 0
    rows = _manifest(run)
    assert len(rows) == 498
    test = [r for r in rows if r["split"] == "test"]
    assert len(test) == 92 and sum(r["label"] == "none" for r in test) == 38
    assert all(r["fold"] == "4" for r in test)
    assert all(r["fold"] == "3" for r in rows if r["split"] == "valid")
    patients: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        patients[row["group"]].add(row["split"])
    assert all(len(s) == 1 for s in patients.values())


@pytest.mark.timeout(900)
def test_prepare_fit_evaluate_export_and_the_daemon_predicts_the_same(
        prepared: tuple[Path, object], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run, _ = prepared
    bundle = tmp_path / "bundle"
    assert train_main(["fit", "--run", str(run)]) == 0
    for phase in (1, 2):
        assert (run / f"phase{phase}" / "best.keras").is_file()
        history = list(csv.DictReader((run / f"phase{phase}" / "history.csv").open()))
        assert len(history) == 1 and 0.0 <= float(history[0]["val_auc"]) <= 1.0
    assert train_main(["fit", "--run", str(run)]) == 0  # finished phases are not run again
    assert len(list(csv.DictReader((run / "phase2" / "history.csv").open()))) == 1
    assert train_main(["evaluate", "--run", str(run)]) == 0
    metrics = json.loads((run / "evaluation" / "metrics.json").read_text())
    thresholds = metrics["bundle_thresholds"]
    assert thresholds["urgent"] >= thresholds["decision"] >= thresholds["elevated"]
    assert metrics["test"]["images"] == sum(r["split"] == "test" for r in _manifest(run))
    assert set(metrics["test_by_source"]) == {"siim"}
    for png in ("curves", "roc", "confusion"):
        assert (run / "evaluation" / f"{png}.png").stat().st_size > 5000
    report = (run / "evaluation" / "report.md").read_text()
    assert "77.83 %" in report and "![roc](roc.png)" in report and "from scratch" in report
    for thesis in ("76.67 %", "75.20 %", "[[238 98] [213 705]]", "[[215 121] [157 761]]",
                   "82.9 % / 64.0 %", "1,254 images"):
        assert thesis in report, thesis
    phase1 = metrics["phase1"]
    assert phase1["checkpoint"] == "phase1/best.keras" and "| phase 1, test" in report
    assert sum(map(sum, phase1["test"]["argmax"]["confusion_matrix"])) == metrics["test"]["images"]
    assert "not meaningful: n < 30" in report  # the tiny test split
    # The bundle's thresholds keep the validation sensitivity at each target.
    valid_rows = [r for r in csv.DictReader((run / "evaluation" / "predictions.csv").open())
                  if r["split"] == "valid"]
    y_valid = np.array([r["label"] == "opacity" for r in valid_rows], dtype=int)
    p_valid = np.array([float(r["probability"]) for r in valid_rows])
    for name, target in (("urgent", 0.90), ("decision", 0.95), ("elevated", 0.98)):
        assert at_threshold(y_valid, p_valid, thresholds[name])["sensitivity"] >= target, name
    assert train_main(["status", "--run", str(run)]) == 0
    status = capsys.readouterr().out
    assert "phase 1: done, 1/1 epochs" in status and "phase 2: done, 1/1 epochs" in status, status
    assert f"evaluated: final test {metrics['test']['images']} images, AUC" in status
    assert "prepared: 38 images" in status, status
    assert train_main(["export", "--run", str(run), "--bundle", str(bundle), "--version", "0.0.1-test"]) == 0

    info = subprocess.run([sys.executable, "-m", "daemon.cli", "model", "info", str(bundle)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert info.returncode == 0, info.stderr
    assert "NOT FOR CLINICAL USE" in info.stdout and "data_manifest_sha256" in info.stdout
    assert f'"decision": {thresholds["decision"]}' in info.stdout

    from model.predictor import Predictor
    from model.preprocess import preprocess

    predictor = Predictor(bundle)
    assert predictor.manifest.thresholds.decision == thresholds["decision"]
    predictions = list(csv.DictReader((run / "evaluation" / "predictions.csv").open()))
    paths = {r["image_id"]: r["path"] for r in _manifest(run)}
    for row in [p for p in predictions if p["split"] == "test"][:3]:
        pre = preprocess(paths[row["image_id"]], predictor.manifest.preprocessing)
        daemon_p = predictor.predict(pre.array[None])
        assert abs(float(daemon_p[0]) - float(row["probability"])) < 1e-5, row


def test_training_code_uses_no_tensorflow_api() -> None:
    for path in (REPO / "training").rglob("*.py"):
        text = path.read_text()
        assert "import tensorflow" not in text and not re.search(r"\btf\.[A-Za-z_]", text), path
        assert "ImageDataGenerator(" not in text and "keras.preprocessing.image" not in text, path


def test_prepare_killed_midway_can_be_run_again_into_the_same_folder(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import time

    data = make_tiny_data(tmp_path)
    config = write_training_config(tmp_path / "t.toml", data)
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "training", "prepare", "--config", str(config),
                             "--run", str(run)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (run / "data" / "equalized.npy").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "prepare never wrote its cache"
            time.sleep(0.002)
    finally:
        proc.kill()
        proc.wait()
    if (run / "config.toml").exists():
        pytest.skip("the machine was too fast: prepare finished before the kill")
    assert train_main(["status", "--run", str(run)]) == 0
    assert "prepare: not finished" in capsys.readouterr().out
    assert train_main(["fit", "--run", str(run)]) == EXIT_USAGE
    assert "is not a prepared run" in capsys.readouterr().err
    assert train_main(["prepare", "--config", str(config), "--run", str(run)]) == 0
    assert (run / "config.toml").is_file() and (run / "data" / "manifest.csv").is_file()


def test_early_stopping_counts_epochs_from_before_a_resume() -> None:
    from training.state import PhaseState

    state = PhaseState(history=[{"epoch": i, "val_auc": v} for i, v in enumerate([0.5, 0.7, 0.6, 0.7])])
    assert state.epochs_without_improvement() == 2  # a tie is no improvement (as Keras's min_delta 0)
    assert (state.best_epoch(), state.best_val_auc) == (1, 0.7)
    assert state.should_stop(2) and not state.should_stop(3) and not state.should_stop(0)
    assert not PhaseState().should_stop(1)


def test_an_unusable_phase_state_says_how_to_go_on(tmp_path: Path) -> None:
    from training.resume import load_state
    from training.state import ResumeError

    phase = tmp_path / "phase1"
    phase.mkdir()
    (phase / "state.json").write_text('{"epochs_done": 2, "weights": "backup/epoch-0002.weights.h5"}')
    with pytest.raises(ResumeError, match=r"epoch-0002.weights.h5, which is missing; delete .*phase1"):
        load_state(phase, phase / "best.keras", phase / "history.csv")
    (phase / "state.json").write_text("{not json")
    with pytest.raises(ResumeError, match="is not a phase state"):
        load_state(phase, phase / "best.keras", phase / "history.csv")


def _committed_epochs(state: Path) -> int:
    try:
        return int(json.loads(state.read_text())["epochs_done"])
    except (OSError, ValueError):  # not written yet
        return 0


@pytest.mark.timeout(900)
@pytest.mark.parametrize("moment", ["while_saving", "after_commit"])
def test_fit_killed_mid_phase_resumes_where_it_stopped(tmp_path: Path, moment: str,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """kill -9 while the second epoch's backup is being written (a torn HDF5 file on disk),
    or right after the first epoch committed: the next `fit` resumes after the last
    committed epoch and history.csv holds each epoch once."""
    import time

    import keras

    data = make_tiny_data(tmp_path)
    config = write_training_config(tmp_path / "t.toml", data, phase1={"epochs": 3}, phase2={"epochs": 0})
    run = tmp_path / "run"
    assert train_main(["prepare", "--config", str(config), "--run", str(run)]) == 0
    phase = run / "phase1"
    state, backup = phase / "state.json", phase / "backup"

    def torn_backup() -> bool:
        return any(backup.glob(".partial-*"))

    def moment_reached() -> bool:
        done = _committed_epochs(state)
        return done >= 1 and (moment == "after_commit" or torn_backup())

    proc = subprocess.Popen([sys.executable, "-m", "training", "fit", "--run", str(run)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while not moment_reached():
            assert proc.poll() is None, f"fit ended before the {moment} moment"
            assert time.monotonic() < deadline, f"no {moment} moment within 600 s"
            time.sleep(0.005)
    finally:
        proc.kill()
        proc.wait()
    done_before = _committed_epochs(state)
    assert 1 <= done_before < 3 and not (phase / "DONE").exists()
    status = subprocess.run([sys.executable, "-m", "training", "status", "--run", str(run)], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    assert f"phase 1: {done_before}/3 epochs committed" in status.stdout, status.stdout
    assert "phase 2: not configured" in status.stdout and "evaluation: not run" in status.stdout
    if moment == "while_saving":
        assert torn_backup(), "the kill did not land while a backup was being written"
    assert train_main(["fit", "--run", str(run)]) == 0
    epochs = [int(r["epoch"]) for r in csv.DictReader((phase / "history.csv").open())]
    assert epochs == [0, 1, 2], f"resumed after {done_before} epoch(s) but history says {epochs}"
    assert (phase / "DONE").is_file() and not backup.exists()
    best = keras.saving.load_model(phase / "best.keras", compile=False)
    assert best.input_shape[1:3] == (71, 71)
    log = (run / "fit.log").read_text()
    assert f"resumed after epoch {done_before}" in log
    for epoch in range(done_before + 1, 4):
        assert f"phase 1 epoch {epoch}:" in log
    assert train_main(["status", "--run", str(run)]) == 0
    assert "phase 1: done, 3/3 epochs" in capsys.readouterr().out


@pytest.mark.timeout(900)
def test_training_runs_under_jax_and_the_daemon_serves_its_bundle(tmp_path: Path) -> None:
    """GPU hosts have JAX but no TensorFlow: the same code trains there, with mixed precision,
    and the float32 bundle it exports is served by the daemon's TensorFlow predictor with the
    same probabilities."""
    pytest.importorskip("jax")
    data = make_tiny_data(tmp_path)
    # Mixed precision as on a GPU (forced here, on the CPU), batches from two loader threads.
    config = write_training_config(tmp_path / "t.toml", data, phase2={"epochs": 0},
                                   train={"precision": "mixed_float16", "loader_workers": 2})
    run, bundle = tmp_path / "run", tmp_path / "bundle"
    assert train_main(["prepare", "--config", str(config), "--run", str(run)]) == 0
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    for args in (["fit", "--run", str(run)], ["evaluate", "--run", str(run)],
                 ["export", "--run", str(run), "--bundle", str(bundle), "--version", "0.0.1-jax"]):
        proc = subprocess.run([sys.executable, "-m", "training", *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
    fit_record = json.loads((run / "fit.json").read_text())
    assert (fit_record["backend"], fit_record["precision"]) == ("jax", "mixed_float16")
    assert "precision mixed_float16" in (run / "fit.log").read_text()
    from model.predictor import Predictor
    from model.preprocess import preprocess

    predictor = Predictor(bundle)
    assert predictor.manifest.backend == "jax"
    paths = {r["image_id"]: r["path"] for r in _manifest(run)}
    for row in list(csv.DictReader((run / "evaluation" / "predictions.csv").open()))[:3]:
        pre = preprocess(paths[row["image_id"]], predictor.manifest.preprocessing)
        assert abs(float(predictor.predict(pre.array[None])[0]) - float(row["probability"])) < 1e-4, row

"""Model bundles: round trip, validation messages, predictor, CLI, and serve's bundle check."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.bundle import DEMO_NAME, load_bundle, save_bundle
from model.errors import BundleError
from model.manifest import MANIFEST, read_manifest
from model.network import build_xception
from model.predictor import Predictor
from model.preprocess import PreprocessSpec, preprocess
from tests.conftest import OPACITYD, write_config
from tests.factories import make_dx


def _copy(bundle: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(bundle, target)
    return target


def _edit_manifest(bundle: Path, **changes: object) -> None:
    data = json.loads((bundle / MANIFEST).read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key)
        else:
            data[key] = value
    (bundle / MANIFEST).write_text(json.dumps(data))


def test_round_trip_gives_identical_predictions(tmp_path: Path) -> None:
    model = build_xception(71, weights=None)
    batch = np.random.default_rng(1).uniform(-1, 1, (4, 71, 71, 3)).astype(np.float32)
    before = np.asarray(model.predict_on_batch(batch))
    manifest = save_bundle(model, tmp_path / "b", name="t", version="1",
                           spec=PreprocessSpec(input_size=71))
    loaded, again = load_bundle(tmp_path / "b")
    np.testing.assert_array_equal(before, np.asarray(loaded.predict_on_batch(batch)))
    assert again == manifest
    assert manifest.label == "t 1 (NOT FOR CLINICAL USE)"
    with pytest.raises(BundleError, match="already holds a bundle"):
        save_bundle(model, tmp_path / "b", name="t", version="2", spec=PreprocessSpec(input_size=71))


def test_an_export_interrupted_before_its_manifest_can_be_redone(tmp_path: Path) -> None:
    """Weights without a manifest (a kill between the two) are not a bundle: the daemon refuses
    them by name, and the next export into the same folder completes it."""
    model = build_xception(71, weights=None)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "model.keras").write_bytes(b"left by a killed export")
    with pytest.raises(BundleError, match="manifest.json"):
        load_bundle(tmp_path / "b")
    save_bundle(model, tmp_path / "b", name="t", version="1", spec=PreprocessSpec(input_size=71))
    assert load_bundle(tmp_path / "b")[1].version == "1"


def test_demo_bundle_is_untrained_unvalidated_and_named_so(demo_bundle: Path) -> None:
    manifest = read_manifest(demo_bundle)
    assert manifest.name == DEMO_NAME and not manifest.validated
    assert "NOT FOR CLINICAL USE" in manifest.label


def test_corrupted_weights_fail_the_checksum(demo_bundle: Path, tmp_path: Path) -> None:
    bundle = _copy(demo_bundle, tmp_path)
    with (bundle / "model.keras").open("r+b") as fh:
        fh.seek(1000)
        fh.write(b"\x00\x01\x02\x03")
    with pytest.raises(BundleError, match="checksum mismatch"):
        load_bundle(bundle)


def test_input_size_that_disagrees_with_the_model_is_refused(demo_bundle: Path, tmp_path: Path) -> None:
    bundle = _copy(demo_bundle, tmp_path)
    spec = json.loads((bundle / MANIFEST).read_text())["preprocessing"]
    _edit_manifest(bundle, preprocessing={**spec, "input_size": 99})
    with pytest.raises(BundleError, match=r"does not match the manifest's input_size 99"):
        load_bundle(bundle)


def test_class_count_that_disagrees_with_the_model_is_refused(demo_bundle: Path, tmp_path: Path) -> None:
    bundle = _copy(demo_bundle, tmp_path)
    _edit_manifest(bundle, class_names=["none", "opacity", "other"])
    with pytest.raises(BundleError, match="model has 2 outputs but the manifest names 3 classes"):
        load_bundle(bundle)


@pytest.mark.parametrize(("change", "message"), [
    ({"validated": None, "name": None}, "missing keys: name, validated"),
    ({"validated": "yes"}, "manifest validated = 'yes': expected bool"),
    ({"positive_class": "tumour"}, "positive_class 'tumour' is not in class_names"),
    ({"thresholds": {"decision": 1.5, "urgent": 0.9, "elevated": 0.5}}, "thresholds.decision = 1.5"),
    ({"schema_version": 7}, "schema_version 7 is not 1"),
])
def test_bad_manifests_are_refused_with_the_reason(demo_bundle: Path, tmp_path: Path,
                                                   change: dict[str, object], message: str) -> None:
    bundle = _copy(demo_bundle, tmp_path)
    _edit_manifest(bundle, **change)
    with pytest.raises(BundleError, match=message):
        read_manifest(bundle)


def test_missing_bundle_parts_are_named(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="is not a directory"):
        read_manifest(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="has no manifest.json"):
        read_manifest(tmp_path / "empty")


def test_predictor_returns_one_probability_per_image(demo_bundle: Path) -> None:
    predictor = Predictor(demo_bundle)
    inputs = np.stack([preprocess(make_dx(seed=i), predictor.manifest.preprocessing).array
                       for i in range(3)])
    p = predictor.predict(inputs)
    assert p.shape == (3,) and np.all((p >= 0) & (p <= 1))
    assert predictor.device.startswith("tensorflow:")
    with pytest.raises(ValueError, match="does not match"):
        predictor.predict(np.zeros((1, 80, 80, 3), dtype=np.float32))


def test_imagenet_weights_without_network_fail_with_a_clear_message(tmp_path: Path) -> None:
    env = {**os.environ, "https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
           "KERAS_HOME": str(tmp_path)}
    code = ("from model.network import build_xception\n"
            "from model.errors import WeightsUnavailable\n"
            "try:\n    build_xception(71, 'imagenet')\n"
            "except WeightsUnavailable as e:\n    print('REFUSED', e)\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=180)
    assert "REFUSED could not download the Xception ImageNet weights" in proc.stdout, proc.stderr[-2000:]


def _other_backend() -> str | None:
    for backend, module in (("jax", "jax"), ("torch", "torch")):
        probe = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True)
        if probe.returncode == 0:
            return backend
    return None


def test_bundle_saved_under_tensorflow_loads_under_another_backend(demo_bundle: Path) -> None:
    backend = _other_backend()
    if backend is None:
        pytest.skip("neither JAX nor PyTorch is installed here; only the TensorFlow backend is")
    batch = np.random.default_rng(2).uniform(-1, 1, (2, 71, 71, 3)).astype(np.float32)
    expected = Predictor(demo_bundle).predict(batch)
    code = ("import sys, numpy as np\nfrom model.predictor import Predictor\n"
            "b = np.random.default_rng(2).uniform(-1, 1, (2, 71, 71, 3)).astype(np.float32)\n"
            "print(Predictor(__import__('pathlib').Path(sys.argv[1])).predict(b).tolist())\n")
    proc = subprocess.run([sys.executable, "-c", code, str(demo_bundle)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "KERAS_BACKEND": backend})
    assert proc.returncode == 0, proc.stderr[-2000:]
    actual = json.loads(proc.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(actual, expected, atol=1e-4)


def test_model_info_cli(demo_bundle: Path) -> None:
    proc = subprocess.run([OPACITYD, "model", "info", str(demo_bundle)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0
    assert f"{DEMO_NAME} 0.0.0-demo (NOT FOR CLINICAL USE)" in proc.stdout
    assert "checksum:     OK" in proc.stdout and "71 x 71 x 3" in proc.stdout


def test_model_predict_cli_scores_dicom_and_png_and_gives_refusals(demo_bundle: Path,
                                                                   tmp_path: Path) -> None:
    dcm = tmp_path / "a.dcm"
    make_dx(128, 128).save_as(dcm, enforce_file_format=True)
    png = tmp_path / "b.png"
    Image.fromarray(np.linspace(0, 255, 128 * 128).reshape(128, 128).astype(np.uint8)).save(png)
    sr = tmp_path / "c.dcm"
    no_pixels = make_dx()
    del no_pixels.PixelData
    no_pixels.save_as(sr, enforce_file_format=True)
    proc = subprocess.run([OPACITYD, "model", "predict", str(demo_bundle), str(dcm), str(png),
                           str(sr), "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert out["model"].endswith("(NOT FOR CLINICAL USE)")
    first, second, third = out["results"]
    assert 0 <= first["probability"] <= 1 and 0 <= second["probability"] <= 1
    assert third["refused"] == "no_pixel_data"


def test_model_preview_cli_writes_the_side_by_side_png(tmp_path: Path) -> None:
    dcm = tmp_path / "a.dcm"
    make_dx(300, 200).save_as(dcm, enforce_file_format=True)
    out = tmp_path / "p" / "preview.png"
    proc = subprocess.run([OPACITYD, "model", "preview", str(dcm), "-o", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    with Image.open(out) as img:
        assert img.size == (round(200 * 512 / 300) + 512 + 10, 512 + 24)


def test_serve_refuses_to_start_without_a_bundle_and_says_how_to_get_one(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "d")
    env = {k: v for k, v in os.environ.items() if k != "OPACITYD_MODEL"}
    proc = subprocess.run([OPACITYD, "--config", str(cfg), "serve"], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 2
    assert "no model bundle configured" in proc.stderr and "opacityd model init-demo" in proc.stderr


def test_serve_refuses_a_bundle_with_a_bad_checksum(demo_bundle: Path, tmp_path: Path) -> None:
    bundle = _copy(demo_bundle, tmp_path)
    _edit_manifest(bundle, weights_sha256="0" * 64)
    cfg = write_config(tmp_path / "d", bundle=bundle)
    proc = subprocess.run([OPACITYD, "--config", str(cfg), "serve"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "checksum mismatch" in proc.stderr

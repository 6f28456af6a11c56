"""Model bundles: a directory with ``model.keras`` and ``manifest.json``.

``save_bundle`` writes both (sha256 of the weights in the manifest);
``load_bundle`` checks the manifest, the checksum, the input shape and the
class count, and names what is wrong when any of them fails.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import keras

from model.durable import save_model_durably
from model.errors import BundleError
from model.manifest import MANIFEST, WEIGHTS, Manifest, Thresholds, read_manifest, sha256_file, write_manifest
from model.network import CLASS_NAMES, POSITIVE_CLASS, build_xception
from model.preprocess import PreprocessSpec

DEMO_NAME = "opacity-xception-UNTRAINED-DEMO"


def save_bundle(model: keras.Model, bundle: Path, *, name: str, version: str,
                spec: PreprocessSpec, thresholds: Thresholds | None = None,
                training: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None,
                validated: bool = False) -> Manifest:
    """Write ``model`` and its manifest into ``bundle`` (created; must not hold a bundle).

    Weights first, manifest last (each written durably): the manifest makes the bundle, so
    weights left by an export killed before it are overwritten by the next export.
    """
    bundle.mkdir(parents=True, exist_ok=True)
    if (bundle / MANIFEST).exists():
        raise BundleError(f"{bundle} already holds a bundle; choose a new directory")
    save_model_durably(model, bundle / WEIGHTS)
    manifest = Manifest(
        name=name, version=version, created=datetime.now(UTC).isoformat(timespec="seconds"),
        keras_version=keras.__version__, backend=keras.backend.backend(), preprocessing=spec,
        class_names=CLASS_NAMES, positive_class=POSITIVE_CLASS,
        thresholds=thresholds or Thresholds(), weights_sha256=sha256_file(bundle / WEIGHTS),
        validated=validated, training=training or {}, metrics=metrics or {},
    )
    write_manifest(bundle, manifest)
    return manifest


def load_bundle(bundle: Path) -> tuple[keras.Model, Manifest]:
    """Load and validate a bundle; raises :class:`BundleError` naming the problem."""
    manifest = read_manifest(bundle)
    try:
        model = keras.saving.load_model(bundle / WEIGHTS, compile=False)
    except Exception as e:  # noqa: BLE001 - Keras raises many types for a bad archive
        raise BundleError(f"cannot load {bundle / WEIGHTS}: {type(e).__name__}: {e}"[:300]) from e
    expected_in = (None, manifest.input_size, manifest.input_size, 3)
    actual_in = tuple(model.input_shape)
    if actual_in != expected_in:
        raise BundleError(f"model input shape {actual_in} does not match the manifest's "
                          f"input_size {manifest.input_size} (expected {expected_in})")
    outputs = model.output_shape[-1]
    if outputs != len(manifest.class_names):
        raise BundleError(f"model has {outputs} outputs but the manifest names "
                          f"{len(manifest.class_names)} classes {list(manifest.class_names)}")
    return model, manifest


def init_demo_bundle(bundle: Path, input_size: int = 299, seed: int = 0) -> Manifest:
    """An untrained network so a newcomer can run the whole daemon; never validated."""
    keras.utils.set_random_seed(seed)
    model = build_xception(input_size, weights=None, name="opacity_xception_demo")
    spec = dataclasses.replace(PreprocessSpec(), input_size=input_size)
    return save_bundle(model, bundle, name=DEMO_NAME, version="0.0.0-demo", spec=spec,
                       training={"note": "untrained: random weights, for demonstration only"},
                       validated=False)

"""`export`: the best checkpoint as a model bundle the daemon serves unchanged.

The manifest carries the evaluation metrics, the thresholds chosen on the validation split,
the data manifest's hash and the run's configuration. Bundles are never marked validated
here: that is a clinical decision made outside training.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from model.bundle import save_bundle
from model.manifest import Manifest, Thresholds, sha256_file
from training.config import Config
from training.fit import best_checkpoint
from training.precision import float32_network
from training.prepare import preprocess_spec
from training.run import RunPaths


def export(config: Config, paths: RunPaths, bundle: Path, name: str, version: str) -> Manifest:
    if not paths.metrics.is_file():
        raise FileNotFoundError(f"{paths.metrics} does not exist; run `python -m training evaluate` first")
    metrics: dict[str, Any] = json.loads(paths.metrics.read_text())
    # A fresh, uncompiled float32 copy: the bundle carries weights, not optimizer state, and
    # never the mixed precision training may have used.
    model = float32_network(best_checkpoint(config, paths), config.model.input_size)
    fit_record = json.loads((paths.root / "fit.json").read_text())
    training = {
        "run": paths.root.name,
        "backbone_weights": config.model.weights,
        "split_strategy": config.split.strategy,
        "fit": fit_record,
        "data_manifest_sha256": sha256_file(paths.manifest),
        "data_summary_sha256": sha256_file(paths.summary),
        "config_toml": config.text,
    }
    return save_bundle(model, bundle, name=name, version=version, spec=preprocess_spec(config),
                       thresholds=Thresholds(**metrics["bundle_thresholds"]),
                       training=training, metrics=metrics, validated=False)

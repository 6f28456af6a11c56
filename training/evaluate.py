"""`evaluate`: the best checkpoint on the validation and final test splits.

Thresholds are chosen on the validation split (final phase's sources) for the target
sensitivities and applied unchanged to the test split; the final test set never chooses a
checkpoint or a threshold. Figures per source expose shortcuts; intervals are cluster
bootstraps over patients where the data knows them. When phase 2 ran, phase 1's best
checkpoint is scored too, as the thesis reported both phases.
"""

from __future__ import annotations

import csv
import json
from typing import Any

import keras
import numpy as np

from training.config import Config
from training.dataset import Row, load_rows, open_cache, select
from training.diagnose import (
    COLLAPSE_SPREAD,
    batch_statistics_probabilities,
    collapse_diagnosis,
    spread,
)
from training.fit import best_checkpoint, predict_probabilities
from training.metrics import summarize, threshold_for_sensitivity
from training.plots import write_all
from training.precision import float32_network
from training.records import Split
from training.report import write_report
from training.run import RunPaths
from training.splits import source_matches


def bundle_thresholds(chosen: dict[float, float], config: Config) -> dict[str, float]:
    """decision = the decision sensitivity's threshold; urgent = the lowest target sensitivity's
    (highest threshold); elevated = the highest target sensitivity's (lowest threshold). Exact
    values: rounding could raise a threshold above a positive's probability and so drop the
    validation sensitivity below its target."""
    targets = sorted(chosen)
    return {"decision": chosen[config.evaluate.decision_sensitivity],
            "urgent": chosen[targets[0]], "elevated": chosen[targets[-1]]}


def choose_thresholds(y_valid: np.ndarray, p_valid: np.ndarray,
                      config: Config) -> tuple[dict[float, float], dict[str, float]]:
    """The threshold for each target sensitivity on the validation split, and the bundle's."""
    chosen = {t: threshold_for_sensitivity(y_valid, p_valid, t)
              for t in config.evaluate.target_sensitivities}
    return chosen, bundle_thresholds(chosen, config)


def _errors(cache: np.ndarray, rows: list[Row], p: np.ndarray, decision: float,
            count: int, sources: tuple[str, ...]) -> dict[str, list[tuple[np.ndarray, str]]]:
    y = np.array([r.target for r in rows])
    shown = [source_matches(r.source, sources) for r in rows]
    fp = [i for i in np.argsort(-p) if shown[i] and y[i] == 0 and p[i] >= decision][:count]
    fn = [i for i in np.argsort(p) if shown[i] and y[i] == 1 and p[i] < decision][:count]
    caption = lambda i: f"p={p[i]:.3f} {rows[i].source[:14]}"  # noqa: E731
    return {"false positives": [(np.asarray(cache[rows[i].cache_index]), caption(i)) for i in fp],
            "false negatives": [(np.asarray(cache[rows[i].cache_index]), caption(i)) for i in fn]}


def _targets(rows: list[Row]) -> np.ndarray:
    return np.array([r.target for r in rows])


def _groups(rows: list[Row]) -> np.ndarray:
    return np.array([r.group for r in rows])


def _phase1(config: Config, paths: RunPaths, cache: np.ndarray, rows: list[Row],
            test: list[Row]) -> dict[str, Any]:
    """Phase 1's best checkpoint on phase 1's validation split and on the final test, at argmax
    and at phase 1's own decision threshold (chosen on its validation split)."""
    model = float32_network(paths.checkpoint(1), config.model.input_size)
    valid = select(rows, Split.VALID, config.phase1.sources, phase=1)
    batch, rounds, seed = config.train.batch_size, config.evaluate.bootstrap, config.split.seed
    p_valid = predict_probabilities(model, cache, valid, batch)
    p_test = predict_probabilities(model, cache, test, batch)
    decision = threshold_for_sensitivity(_targets(valid), p_valid, config.evaluate.decision_sensitivity)
    return {"checkpoint": str(paths.checkpoint(1).relative_to(paths.root)),
            "valid": summarize(_targets(valid), p_valid, decision, rounds, seed, _groups(valid)),
            "test": summarize(_targets(test), p_test, decision, rounds, seed, _groups(test))}


def _training_steps(config: Config, paths: RunPaths, train_images: int, phase: int) -> int:
    fit_file = paths.root / "fit.json"
    if not fit_file.is_file():
        return 0
    epochs = json.loads(fit_file.read_text())["phases"].get(str(phase), {}).get("epochs_run", 0)
    batches = -(-train_images // config.train.batch_size)
    if config.train.steps_per_epoch:
        batches = min(batches, config.train.steps_per_epoch)
    return int(epochs) * batches


def evaluate(config: Config, paths: RunPaths) -> dict[str, Any]:
    checkpoint = best_checkpoint(config, paths)
    final_phase = 2 if checkpoint == paths.checkpoint(2) else 1
    model = float32_network(checkpoint, config.model.input_size)
    rows = load_rows(paths.manifest)
    cache = open_cache(paths.cache)
    final_sources = config.phase2.sources if final_phase == 2 else config.phase1.sources
    valid = select(rows, Split.VALID, final_sources, phase=final_phase)
    test = select(rows, Split.TEST)
    batch = config.train.batch_size
    p_valid = predict_probabilities(model, cache, valid, batch)
    p_test = predict_probabilities(model, cache, test, batch)
    y_valid, y_test = _targets(valid), _targets(test)
    chosen, thresholds = choose_thresholds(y_valid, p_valid, config)
    rounds, seed = config.evaluate.bootstrap, config.split.seed
    metrics: dict[str, Any] = {
        "checkpoint": str(checkpoint.relative_to(paths.root)),
        "split_strategy": config.split.strategy,
        "bootstrap": "clusters (patient, study or image: the manifest's group)",
        "thresholds_for_sensitivity": {f"{t:.2f}": v for t, v in chosen.items()},
        "bundle_thresholds": thresholds,
        "valid": summarize(y_valid, p_valid, thresholds["decision"], rounds, seed, _groups(valid)),
        "test": summarize(y_test, p_test, thresholds["decision"], rounds, seed, _groups(test)),
        "test_by_source": {},
        "test_probability_range": [float(p_test.min()), float(p_test.max())] if len(p_test) else None,
    }
    metrics["phase1"] = (_phase1(config, paths, cache, rows, test) if final_phase == 2
                         else {"checkpoint": metrics["checkpoint"], "valid": metrics["valid"],
                               "test": metrics["test"]})
    if len(p_test) and spread(p_test) < COLLAPSE_SPREAD:
        copy = float32_network(checkpoint, config.model.input_size)
        p_batch = batch_statistics_probabilities(copy, cache, test, batch)
        train_images = len(select(rows, Split.TRAIN, final_sources, phase=final_phase))
        metrics["collapse"] = collapse_diagnosis(
            y_test, p_test, p_batch, config.train.batchnorm_momentum,
            _training_steps(config, paths, train_images, final_phase))
    sources = sorted({r.source for r in test})
    for source in sources:
        mask = np.array([r.source == source for r in test])
        metrics["test_by_source"][source] = summarize(y_test[mask], p_test[mask], thresholds["decision"],
                                                      rounds, seed, _groups(test)[mask])
    paths.evaluation.mkdir(parents=True, exist_ok=True)
    with paths.predictions.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image_id", "source", "split", "label", "probability"])
        for split_rows, probs in ((valid, p_valid), (test, p_test)):
            for row, prob in zip(split_rows, probs, strict=True):
                writer.writerow([row.image_id, row.source, row.split.value, row.label.value,
                                 repr(float(prob))])
    paths.metrics.write_text(json.dumps(metrics, indent=2) + "\n")
    curves = {"test (pooled)": (y_test, p_test), "validation": (y_valid, p_valid)}
    if len(sources) > 1:
        for source in sources:
            mask = np.array([r.source == source for r in test])
            curves[f"test {source[:24]}"] = (y_test[mask], p_test[mask])
    plots = write_all(paths, metrics, curves,
                      _errors(cache, test, p_test, thresholds["decision"], config.evaluate.error_examples,
                              config.evaluate.error_grid_sources))
    write_report(config, paths, metrics, plots)
    keras.backend.clear_session()
    return metrics

"""`evaluate`: the best checkpoint on the validation and final test splits.

Thresholds are chosen on the validation split (final phase's sources) for the target
sensitivities and applied unchanged to the test split; figures per source expose shortcuts.
"""

from __future__ import annotations

import csv
import json
from typing import Any

import keras
import numpy as np

from training.config import Config
from training.dataset import Row, load_rows, open_cache, select
from training.fit import best_checkpoint, predict_probabilities
from training.metrics import summarize, threshold_for_sensitivity
from training.plots import write_all
from training.records import Split
from training.report import write_report
from training.run import RunPaths
from training.splits import source_matches


def bundle_thresholds(chosen: dict[float, float], config: Config) -> dict[str, float]:
    """decision = the decision sensitivity's threshold; urgent = the lowest target sensitivity's
    (highest threshold); elevated = the highest target sensitivity's (lowest threshold)."""
    targets = sorted(chosen)
    return {"decision": chosen[config.evaluate.decision_sensitivity],
            "urgent": chosen[targets[0]], "elevated": chosen[targets[-1]]}


def _errors(cache: np.ndarray, rows: list[Row], p: np.ndarray, decision: float,
            count: int, sources: tuple[str, ...]) -> dict[str, list[tuple[np.ndarray, str]]]:
    y = np.array([r.target for r in rows])
    shown = [source_matches(r.source, sources) for r in rows]
    fp = [i for i in np.argsort(-p) if shown[i] and y[i] == 0 and p[i] >= decision][:count]
    fn = [i for i in np.argsort(p) if shown[i] and y[i] == 1 and p[i] < decision][:count]
    caption = lambda i: f"p={p[i]:.3f} {rows[i].source[:14]}"  # noqa: E731
    return {"false positives": [(np.asarray(cache[rows[i].cache_index]), caption(i)) for i in fp],
            "false negatives": [(np.asarray(cache[rows[i].cache_index]), caption(i)) for i in fn]}


def evaluate(config: Config, paths: RunPaths) -> dict[str, Any]:
    checkpoint = best_checkpoint(config, paths)
    model = keras.saving.load_model(checkpoint, compile=False)
    rows = load_rows(paths.manifest)
    cache = open_cache(paths.cache)
    final_sources = config.phase2.sources if config.phase2.epochs else config.phase1.sources
    valid, test = select(rows, Split.VALID, final_sources), select(rows, Split.TEST)
    batch = config.train.batch_size
    p_valid = predict_probabilities(model, cache, valid, batch)
    p_test = predict_probabilities(model, cache, test, batch)
    y_valid = np.array([r.target for r in valid])
    y_test = np.array([r.target for r in test])
    chosen = {t: threshold_for_sensitivity(y_valid, p_valid, t)
              for t in config.evaluate.target_sensitivities}
    thresholds = bundle_thresholds(chosen, config)
    rounds, seed = config.evaluate.bootstrap, config.split.seed
    metrics: dict[str, Any] = {
        "checkpoint": str(checkpoint.relative_to(paths.root)),
        "thresholds_for_sensitivity": {f"{t:.2f}": round(v, 6) for t, v in chosen.items()},
        "bundle_thresholds": {k: round(v, 6) for k, v in thresholds.items()},
        "valid": summarize(y_valid, p_valid, thresholds["decision"], rounds, seed),
        "test": summarize(y_test, p_test, thresholds["decision"], rounds, seed),
        "test_by_source": {},
        "test_probability_range": [round(float(p_test.min()), 6), round(float(p_test.max()), 6)]
        if len(p_test) else None,
    }
    sources = sorted({r.source for r in test})
    for source in sources:
        mask = np.array([r.source == source for r in test])
        metrics["test_by_source"][source] = summarize(y_test[mask], p_test[mask], thresholds["decision"],
                                                      rounds, seed)
    paths.evaluation.mkdir(parents=True, exist_ok=True)
    with paths.predictions.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image_id", "source", "split", "label", "probability"])
        for split_rows, probs in ((valid, p_valid), (test, p_test)):
            for row, prob in zip(split_rows, probs, strict=True):
                writer.writerow([row.image_id, row.source, row.split.value, row.label.value, f"{prob:.8f}"])
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
    return metrics

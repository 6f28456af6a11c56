"""Figures a reviewer asks for: AUC with a bootstrap interval, confusion matrix (none first),
sensitivity/specificity, and thresholds chosen for target sensitivities."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import confusion_matrix, roc_auc_score


def auc(y: np.ndarray, p: np.ndarray) -> float | None:
    """ROC AUC, or None when only one class is present."""
    return float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else None


MIN_MEANINGFUL = 30
"""Below this many images a figure (per source) is listed but flagged as not meaningful."""


def bootstrap_auc(y: np.ndarray, p: np.ndarray, rounds: int, seed: int,
                  groups: np.ndarray | None = None) -> tuple[float, float] | None:
    """95 % percentile interval of the AUC over ``rounds`` resamples.

    With ``groups`` (a patient, study or image id per image) whole groups are resampled (a
    cluster bootstrap): images of one patient are not independent, and resampling them one by
    one gives an interval that is too narrow. Without, images are resampled."""
    if auc(y, p) is None or rounds <= 0:
        return None
    keys = np.arange(len(y)) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1]
    members = np.split(np.argsort(keys, kind="stable"), np.cumsum(np.bincount(keys))[:-1])
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(rounds):
        chosen = rng.integers(0, len(members), len(members))
        idx = np.concatenate([members[k] for k in chosen])
        value = auc(y[idx], p[idx])
        if value is not None:
            values.append(value)
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def threshold_for_sensitivity(y: np.ndarray, p: np.ndarray, target: float) -> float:
    """The highest threshold whose sensitivity (p >= t among positives) reaches ``target``."""
    positives = np.sort(p[y == 1])[::-1]
    if len(positives) == 0:
        raise ValueError("no positive images to choose a threshold on")
    needed = int(np.ceil(target * len(positives)))
    return float(positives[max(needed, 1) - 1])


def at_threshold(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, Any]:
    """Accuracy, sensitivity, specificity and the confusion matrix at ``p >= threshold``. The
    threshold is kept exact: a rounded one can land above a positive's probability."""
    predicted = (p >= threshold).astype(int)
    matrix = confusion_matrix(y, predicted, labels=[0, 1])
    (tn, fp), (fn, tp) = matrix.tolist()
    return {
        "threshold": threshold,
        "accuracy": float((tp + tn) / max(1, len(y))),
        "sensitivity": float(tp / (tp + fn)) if tp + fn else None,
        "specificity": float(tn / (tn + fp)) if tn + fp else None,
        "confusion_matrix": matrix.tolist(),
    }


def summarize(y: np.ndarray, p: np.ndarray, decision: float, rounds: int, seed: int,
              groups: np.ndarray | None = None) -> dict[str, Any]:
    """Images, patients (``groups``), class counts, AUC with a (cluster) bootstrap interval,
    accuracy at argmax (0.5) and at ``decision``; ``meaningful`` is false below
    :data:`MIN_MEANINGFUL` images."""
    interval = bootstrap_auc(y, p, rounds, seed, groups)
    return {
        "images": int(len(y)), "opacity": int(y.sum()), "none": int(len(y) - y.sum()),
        "clusters": int(len(np.unique(groups))) if groups is not None else int(len(y)),
        "meaningful": bool(len(y) >= MIN_MEANINGFUL),
        "auc": auc(y, p), "auc_95ci": list(interval) if interval else None,
        "argmax": at_threshold(y, p, 0.5),
        "decision": at_threshold(y, p, decision),
    }

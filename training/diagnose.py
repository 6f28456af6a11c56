"""Why a model gives every image (almost) the same probability.

A network trained from scratch for a few hundred steps can rank images well while its
BatchNormalization layers use each batch's own statistics (training), and still give every
image the same output at inference, when those layers use their moving averages: with
Keras's momentum 0.99 the averages still lag weights that change quickly, and dozens of
mismatched layers in a row flatten the output. Scoring the same images with batch statistics
tells that case from a network that learned nothing that separates the images.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from training.dataset import Row, inputs
from training.metrics import auc

COLLAPSE_SPREAD = 0.05
"""Probabilities spanning less than this (max - min) count as collapsed."""


def spread(p: np.ndarray) -> float:
    return float(p.max() - p.min()) if len(p) else 0.0


def batch_statistics_probabilities(model: keras.Model, cache: np.ndarray, rows: list[Row],
                                   batch_size: int) -> np.ndarray:
    """P(opacity) with BatchNormalization in training mode (each batch's own statistics).
    Calling in training mode also moves the layers' moving averages: pass a throw-away copy."""
    out = []
    for start in range(0, len(rows), batch_size):
        batch = inputs(cache, rows[start:start + batch_size])
        out.append(np.asarray(keras.ops.convert_to_numpy(model(batch, training=True)))[:, 1])
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


def collapse_diagnosis(y: np.ndarray, p_moving: np.ndarray, p_batch: np.ndarray,
                       momentum: float, steps: int) -> dict[str, Any]:
    """The figures and a one-line reason, for report.md."""
    figures: dict[str, Any] = {
        "spread_moving_statistics": spread(p_moving), "auc_moving_statistics": auc(y, p_moving),
        "spread_batch_statistics": spread(p_batch), "auc_batch_statistics": auc(y, p_batch),
        "batchnorm_momentum": momentum, "training_steps": steps,
    }
    if figures["spread_batch_statistics"] >= 2 * COLLAPSE_SPREAD:
        figures["reason"] = (
            f"BatchNormalization moving statistics: with each batch's own statistics the same "
            f"network spreads its test probabilities over {figures['spread_batch_statistics']:.3f} "
            f"(AUC {_fmt(figures['auc_batch_statistics'])}), with the moving averages it uses at "
            f"inference over {figures['spread_moving_statistics']:.4f}; after {steps} training "
            f"steps at momentum {momentum} the averages have not caught up with the weights")
    else:
        figures["reason"] = (
            f"the network itself: even with each batch's own statistics its test probabilities "
            f"span only {figures['spread_batch_statistics']:.4f}, so it has not learned features "
            f"that separate the images in {steps} steps (too few steps, or a learning rate too "
            "high or too low for training from scratch)")
    return figures


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"

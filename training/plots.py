"""PNG plots of a run: training curves, ROC, confusion matrices, most confident errors."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from model.network import CLASS_NAMES  # noqa: E402
from training.metrics import auc  # noqa: E402
from training.run import RunPaths  # noqa: E402


def _history(path: Path) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    with path.open(newline="") as fh:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(fh)]


def training_curves(histories: dict[int, Path], output: Path) -> None:
    """Loss, accuracy and validation AUC per epoch; phases side by side on one epoch axis."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    offset = 0
    for number, path in histories.items():
        rows = _history(path)
        if not rows:
            continue
        epochs = np.arange(offset + 1, offset + len(rows) + 1)
        for ax, keys in zip(axes, (("loss", "val_loss"), ("accuracy", "val_accuracy"), ("val_auc",)),
                            strict=True):
            for key in keys:
                ax.plot(epochs, [r.get(key, np.nan) for r in rows], marker="o", markersize=3,
                        label=f"phase {number} {key}")
        if offset:
            for ax in axes:
                ax.axvline(offset + 0.5, color="grey", linestyle=":")
        offset += len(rows)
    for ax, title in zip(axes, ("loss", "accuracy", "validation ROC AUC"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(output, dpi=90)
    plt.close(fig)


def roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], output: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, (y, p) in curves.items():
        if auc(y, p) is None:
            continue
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, label=f"{name} (AUC {auc(y, p):.3f}, n={len(y)})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(output, dpi=90)
    plt.close(fig)


def confusion(matrices: dict[str, list[list[int]]], output: Path) -> None:
    """Rows: truth, columns: prediction, ``none`` first (the thesis's orientation)."""
    fig, axes = plt.subplots(1, len(matrices), figsize=(4 * len(matrices), 3.6), squeeze=False)
    for ax, (name, matrix) in zip(axes[0], matrices.items(), strict=True):
        m = np.array(matrix)
        ax.imshow(m, cmap="Blues")
        for (i, j), value in np.ndenumerate(m):
            ax.text(j, i, str(value), ha="center", va="center",
                    color="white" if value > m.max() / 2 else "black", fontsize=12)
        ax.set_xticks([0, 1], CLASS_NAMES)
        ax.set_yticks([0, 1], CLASS_NAMES)
        ax.set_xlabel("predicted")
        ax.set_ylabel("truth")
        ax.set_title(name, fontsize=9)
    fig.tight_layout()
    fig.savefig(output, dpi=90)
    plt.close(fig)


def error_grid(examples: dict[str, list[tuple[np.ndarray, str]]], output: Path) -> None:
    """Rows of images as the network sees them (equalised), each titled with its caption."""
    columns = max((len(v) for v in examples.values()), default=0)
    if columns == 0:
        return
    fig, axes = plt.subplots(len(examples), columns, figsize=(1.9 * columns, 2.2 * len(examples)),
                             squeeze=False)
    for row, (name, items) in zip(axes, examples.items(), strict=True):
        for ax in row:
            ax.axis("off")
        for ax, (image, caption) in zip(row, items, strict=False):
            ax.imshow(image, cmap="gray", vmin=0, vmax=1)
            ax.set_title(caption, fontsize=7)
        row[0].text(-0.1, 0.5, name, transform=row[0].transAxes, rotation=90, ha="right",
                    va="center", fontsize=9)
    fig.tight_layout()
    fig.savefig(output, dpi=90)
    plt.close(fig)


def write_all(paths: RunPaths, metrics: dict[str, Any], curves: dict[str, tuple[np.ndarray, np.ndarray]],
              errors: dict[str, list[tuple[np.ndarray, str]]]) -> list[Path]:
    out = paths.evaluation
    files = [out / "curves.png", out / "roc.png", out / "confusion.png", out / "errors.png"]
    training_curves({n: paths.history(n) for n in (1, 2)}, files[0])
    roc(curves, files[1], "ROC, final test (and validation)")
    test = metrics["test"]
    matrices = {"test, argmax (t=0.5)": test["argmax"]["confusion_matrix"],
                f"test, decision t={test['decision']['threshold']:.3f}": test["decision"]["confusion_matrix"]}
    phase1 = metrics.get("phase1")
    if phase1 and phase1["checkpoint"] != metrics["checkpoint"]:
        matrices["phase 1 test, argmax (t=0.5)"] = phase1["test"]["argmax"]["confusion_matrix"]
    confusion(matrices, files[2])
    error_grid(errors, files[3])
    return [f for f in files if f.is_file()]

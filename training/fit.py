"""`fit`: the thesis's two phases, resumable, checkpointing the best validation AUC.

Phase 1: merged data, Xception base frozen, Nadam 1e-3. Phase 2: from phase 1's best
weights, competition data only, whole network trainable, Nadam 0.01. Each phase writes
best.keras, history.csv and, when finished, DONE; a killed phase resumes after its last
committed epoch (training.resume).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from model.device import describe_device
from model.durable import write_text_durably
from model.network import build_xception
from training.augment import build_augmenter
from training.config import Config, PhaseConfig
from training.dataset import Batches, Row, inputs, load_rows, open_cache, select
from training.metrics import auc
from training.precision import precision, resolve_policy
from training.records import Split
from training.resume import BACKUP, EpochCommit, load_state, log_line, restore
from training.run import RunPaths

HEAD_LAYERS = ("gap", "bn", "probabilities")


class ValidationMetrics(keras.callbacks.Callback):  # type: ignore[misc]
    """val_loss, val_accuracy and val_auc (positive class) on the validation split, added to
    the epoch logs before EpochCommit (checkpoints, history, early stopping) reads them."""

    def __init__(self, cache: np.ndarray, rows: list[Row], batch_size: int) -> None:
        super().__init__()
        self.cache, self.rows, self.batch_size = cache, rows, batch_size
        self.y = np.array([r.target for r in rows])
        self.started = time.perf_counter()
        self.train_seconds: list[float] = []
        """Per epoch, the training part only (no validation)."""

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        logs = logs if logs is not None else {}
        self.train_seconds.append(time.perf_counter() - self.started)
        probs = predict_probabilities(self.model, self.cache, self.rows, self.batch_size)
        p = np.clip(probs, 1e-7, 1 - 1e-7)
        logs["val_loss"] = float(-np.mean(self.y * np.log(p) + (1 - self.y) * np.log(1 - p)))
        logs["val_accuracy"] = float(np.mean((probs >= 0.5) == self.y))
        # Never a stand-in value: an AUC of exactly 0.0 is the worst ranking and must lose the
        # checkpoint choice (fit refuses a one-class validation split, where it is undefined).
        value = auc(self.y, probs)
        if value is None:
            raise ValueError("validation split has one class only: ROC AUC is undefined")
        logs["val_auc"] = value


def predict_probabilities(model: keras.Model, cache: np.ndarray, rows: list[Row],
                          batch_size: int) -> np.ndarray:
    """P(opacity) per row, batch by batch with predict_on_batch (as the daemon's Predictor)."""
    out = []
    for start in range(0, len(rows), batch_size):
        batch = inputs(cache, rows[start:start + batch_size])
        out.append(np.asarray(model.predict_on_batch(batch))[:, 1])
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


def _set_trainable(model: keras.Model, train_base: bool) -> None:
    for layer in model.layers:
        layer.trainable = train_base or layer.name in HEAD_LAYERS


def set_batchnorm_momentum(model: keras.Model, momentum: float) -> None:
    """The moving-average momentum of every BatchNormalization layer (training only: inference
    reads the moving statistics, not the momentum). Keras's default is 0.99; a network trained
    from scratch for a few hundred steps needs a faster average, or its moving statistics still
    lag the weights when it is evaluated and every image gets the same probability."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = momentum


def check_validation(number: int, valid: list[Row]) -> None:
    """A phase needs both classes in its validation split: its checkpoints are chosen by AUC."""
    labels = {r.label for r in valid}
    if len(labels) < 2:
        raise ValueError(f"phase {number}: the validation split holds only "
                         f"{', '.join(sorted(labels)) or 'no'} images; ROC AUC, which chooses "
                         "checkpoints, needs both classes")


def _class_weights(rows: list[Row]) -> dict[int, float]:
    counts = np.bincount([r.target for r in rows], minlength=2)
    return {i: float(len(rows) / (2 * max(1, c))) for i, c in enumerate(counts)}


@dataclass(frozen=True)
class PhaseResult:
    number: int
    epochs_run: int
    best_val_auc: float | None
    images_per_second: float


def run_phase(number: int, model: keras.Model, phase: PhaseConfig, config: Config, paths: RunPaths,
              cache: np.ndarray, train: list[Row], valid: list[Row]) -> PhaseResult:
    folder = paths.phase(number)
    folder.mkdir(parents=True, exist_ok=True)
    _set_trainable(model, phase.train_base)
    set_batchnorm_momentum(model, config.train.batchnorm_momentum)
    model.compile(optimizer=keras.optimizers.Nadam(phase.learning_rate),
                  loss="categorical_crossentropy", metrics=["accuracy"])
    augmenter = build_augmenter(config.augment, config.train.seed + number)
    batches = Batches(cache, train, config.train.batch_size, augmenter,
                      seed=config.train.seed + number, max_batches=config.train.steps_per_epoch,
                      workers=config.train.loader_workers,
                      max_queue_size=config.train.prefetch_batches)
    checkpoint, history_csv = paths.checkpoint(number), paths.history(number)
    log_file = paths.root / "fit.log"
    state = load_state(folder, checkpoint, history_csv)
    restore(model, folder, state)
    validation = ValidationMetrics(cache, valid, config.train.batch_size)
    patience = config.train.early_stopping_patience
    commit = EpochCommit(number, folder, checkpoint, history_csv, log_file, state, patience)
    resumed = f", resumed after epoch {state.epochs_done}" if state.epochs_done else ""
    log_line(log_file, f"phase {number}: {len(train)} training / {len(valid)} validation images, "
                       f"{len(batches)} batches of {config.train.batch_size}, lr {phase.learning_rate}, "
                       f"base {'trainable' if phase.train_base else 'frozen'}{resumed}")
    if not state.should_stop(patience):  # else it had stopped early just before a kill
        model.fit(batches, epochs=phase.epochs, initial_epoch=state.epochs_done,
                  callbacks=[validation, commit], verbose=1,
                  class_weight=_class_weights(train) if config.train.class_weights else None)
    epochs_run = commit.state.epochs_done
    images = min(len(train), len(batches) * config.train.batch_size)
    # The first epoch includes graph compilation; the median of the others is the speed.
    timed = validation.train_seconds[1:] or validation.train_seconds
    seconds = float(np.median(timed)) if timed else 0.0
    result = PhaseResult(number, epochs_run, commit.state.best_val_auc,
                         round(images / seconds, 2) if seconds and images else math.nan)
    write_text_durably(paths.done(number), json.dumps(result.__dict__) + "\n")
    shutil.rmtree(folder / BACKUP, ignore_errors=True)
    return result


def _weights_argument(weights: str) -> str | None:
    return None if weights.lower() == "none" else weights


def fit(config: Config, paths: RunPaths) -> dict[str, Any]:
    """Both phases under the configured precision (mixed on a GPU by default); returns and
    writes fit.json."""
    policy = resolve_policy(config.train.precision)
    log_line(paths.root / "fit.log", f"backend {keras.backend.backend()} on {describe_device()}, "
                                     f"precision {policy} (train.precision = {config.train.precision})")
    with precision(policy):
        return _fit(config, paths, policy)


def _fit(config: Config, paths: RunPaths, policy: str) -> dict[str, Any]:
    keras.utils.set_random_seed(config.train.seed)
    rows = load_rows(paths.manifest)
    cache = open_cache(paths.cache)
    record: dict[str, Any] = {"backend": keras.backend.backend(), "keras_version": keras.__version__,
                              "device": describe_device(), "precision": policy,
                              "weights": config.model.weights, "phases": {}}
    for number, phase in ((1, config.phase1), (2, config.phase2)):
        if phase.epochs == 0:
            continue
        train = select(rows, Split.TRAIN, phase.sources, phase=number)
        valid = select(rows, Split.VALID, phase.sources, phase=number)
        if not train or not valid:
            raise ValueError(f"phase {number}: no training or validation images from sources "
                             f"{list(phase.sources)}")
        check_validation(number, valid)
        if paths.done(number).is_file():
            print(f"phase {number}: already finished ({paths.done(number)}); skipped", flush=True)
            record["phases"][number] = json.loads(paths.done(number).read_text())
            continue
        if number == 1:
            model = build_xception(config.model.input_size, _weights_argument(config.model.weights))
        else:
            model = keras.saving.load_model(paths.checkpoint(1), compile=False)
        result = run_phase(number, model, phase, config, paths, cache, train, valid)
        record["phases"][number] = result.__dict__
    (paths.root / "fit.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def best_checkpoint(config: Config, paths: RunPaths) -> Path:
    """Phase 2's best weights when phase 2 ran, else phase 1's."""
    number = 2 if config.phase2.epochs and paths.checkpoint(2).is_file() else 1
    checkpoint = paths.checkpoint(number)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{checkpoint} does not exist; run `python -m training fit` first")
    return checkpoint

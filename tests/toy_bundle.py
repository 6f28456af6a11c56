"""A small trained bundle for tests that need a network whose output depends on the image.

A few strided convolutions and the head of model/network.py, trained for a few seconds
on CPU on the shared labelled radiographs (folds 0-2; fold 3 held out to check that it
learned something; fold 4, the test fold, is never read). Its probabilities move with
the image, unlike the untrained demo bundle's, so a change of model input shows up as a
change of probability.
"""

from __future__ import annotations

import csv
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from model.bundle import save_bundle
from model.preprocess import PreprocessSpec, preprocess

TRAIN_FOLDS = ("0", "1", "2")
HELD_OUT_FOLD = "3"


@dataclass(frozen=True)
class ToyBundle:
    path: Path
    held_out_accuracy: float
    held_out_count: int


def _network(size: int) -> keras.Model:
    inputs = keras.Input(shape=(size, size, 3), name="image")
    x = keras.layers.Conv2D(8, 5, strides=4, padding="same", activation="relu")(inputs)
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(x)
    x = keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu")(x)
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="last_conv")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.BatchNormalization(momentum=0.9, name="bn")(x)
    outputs = keras.layers.Dense(2, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="toy_opacity")


def _load(labelled: Path, folds: tuple[str, ...], spec: PreprocessSpec) -> tuple[np.ndarray, np.ndarray]:
    with (labelled / "labels.csv").open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["fold"] in folds]
    images = np.stack([preprocess(labelled / r["file"], spec).array for r in rows])
    labels = np.array([int(r["label"] == "opacity") for r in rows], dtype=np.int64)
    return images, labels


def train_toy_bundle(labelled: Path, folder: Path, size: int = 299, epochs: int = 15,
                     seed: int = 7) -> ToyBundle:
    """Train the toy network on ``labelled`` (the shared labels.csv layout) and save it as a
    bundle in ``folder``; the held-out accuracy says whether it learned anything."""
    spec = dataclasses.replace(PreprocessSpec(), input_size=size)
    train_x, train_y = _load(labelled, TRAIN_FOLDS, spec)
    held_x, held_y = _load(labelled, (HELD_OUT_FOLD,), spec)
    keras.utils.set_random_seed(seed)
    model = _network(size)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    model.fit(train_x, train_y, batch_size=32, epochs=epochs, verbose=0, shuffle=True)
    predicted = np.asarray(model.predict_on_batch(held_x)).argmax(axis=1)
    path = folder / "toy-bundle"
    save_bundle(model, path, name="toy-opacity-TEST-ONLY", version="0.0.0-test", spec=spec,
                training={"note": "toy network for tests, trained for seconds; meaningless"})
    return ToyBundle(path, float((predicted == held_y).mean()), len(held_y))

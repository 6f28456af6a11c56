"""The thesis network: Xception (no top) -> GlobalAveragePooling -> BatchNormalization -> Dense(2, softmax).

Keras 3 APIs only, so it builds and runs under the TensorFlow, JAX and
PyTorch backends.
"""

from __future__ import annotations

from pathlib import Path

import keras

from model.errors import WeightsUnavailable

CLASS_NAMES = ("none", "opacity")
POSITIVE_CLASS = "opacity"
MIN_INPUT_SIZE = 71
"""Xception's smallest accepted input."""


def build_xception(input_size: int = 299, weights: str | Path | None = None,
                   name: str = "opacity_xception") -> keras.Model:
    """Return the thesis model with ``len(CLASS_NAMES)`` softmax outputs.

    ``weights``: None (random init), a local path to Xception ImageNet "notop"
    weights (.h5), or "imagenet" (downloads; raises :class:`WeightsUnavailable`
    with a clear message when there is no network).
    """
    if input_size < MIN_INPUT_SIZE:
        raise ValueError(f"input_size {input_size} is below Xception's minimum of {MIN_INPUT_SIZE}")
    backbone_weights: str | None
    if weights is None:
        backbone_weights = None
    elif str(weights) == "imagenet":
        backbone_weights = "imagenet"
    else:
        path = Path(weights)
        if not path.is_file():
            raise WeightsUnavailable(f"Xception weights file {path} does not exist")
        backbone_weights = str(path)
    inputs = keras.Input(shape=(input_size, input_size, 3), name="image")
    try:
        backbone = keras.applications.Xception(include_top=False, weights=backbone_weights,
                                               input_tensor=inputs)
    except Exception as e:  # noqa: BLE001 - download/HDF5 errors come in many types
        if backbone_weights == "imagenet":
            raise WeightsUnavailable(
                "could not download the Xception ImageNet weights (no network?); pass the path "
                "of xception_weights_tf_dim_ordering_tf_kernels_notop.h5 instead, or None"
            ) from e
        raise WeightsUnavailable(f"cannot load Xception weights from {weights}: {e}") from e
    x = keras.layers.GlobalAveragePooling2D(name="gap")(backbone.output)
    x = keras.layers.BatchNormalization(name="bn")(x)
    outputs = keras.layers.Dense(len(CLASS_NAMES), activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=name)

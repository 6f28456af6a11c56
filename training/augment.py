"""The thesis's augmentation as Keras 3 preprocessing layers (backend-neutral, no tf.*).

Applied to the equalised [0, 1] image, one channel, before the network scaling:
horizontal flip, zoom 0.1 (each axis independently, like ImageDataGenerator's zoom_range),
shear (ImageDataGenerator's shear_range is an angle in degrees: 0.05 degrees is a shear factor
of tan(0.05 deg) = 0.0009), brightness x[0.8, 1.1] (multiplicative, clipped to [0, 1]).

One deliberate difference from the thesis: ImageDataGenerator applied brightness before its
preprocessing_function (equalize_hist), which largely undid it; here it acts after equalisation.

Each batch's random transformation is drawn from its own seed (:func:`augment`), not from the
layers' shared seed state, so batches can be prepared in parallel threads ahead of the
training step and still come out the same for the same seed.
"""

from __future__ import annotations

import math
from typing import Any

import keras
import numpy as np

from training.config import AugmentConfig


class RandomBrightnessScale(keras.layers.Layer):
    """Multiply each image by a factor drawn from [low, high]; clip to [0, 1]."""

    def __init__(self, low: float, high: float, seed: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.low, self.high = low, high
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images: Any, training: bool = True) -> Any:
        return self.apply(images, self.seed_generator) if training else images

    def apply(self, images: Any, seed: keras.random.SeedGenerator) -> Any:
        """The layer's random change, drawn from ``seed``."""
        shape = (keras.ops.shape(images)[0], 1, 1, 1)
        factors = keras.random.uniform(shape, self.low, self.high, seed=seed)
        return keras.ops.clip(images * factors, 0.0, 1.0)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "low": self.low, "high": self.high}


def build_augmenter(config: AugmentConfig, seed: int) -> keras.Sequential:
    layers: list[keras.layers.Layer] = []
    if config.horizontal_flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed))
    if config.zoom > 0:
        z = config.zoom
        layers.append(keras.layers.RandomZoom((-z, z), (-z, z), fill_mode="nearest", seed=seed + 1))
    if config.shear_degrees > 0:
        factor = math.tan(math.radians(config.shear_degrees))
        layers.append(keras.layers.RandomShear(x_factor=factor, y_factor=0.0, fill_mode="nearest",
                                               seed=seed + 2))
    low, high = config.brightness
    if (low, high) != (1.0, 1.0):
        layers.append(RandomBrightnessScale(low, high, seed=seed + 3))
    return keras.Sequential(layers, name="augment")


def augment(augmenter: keras.Sequential, equalized: np.ndarray, seed: int) -> np.ndarray:
    """(n, h, w) equalised images -> augmented (n, h, w), float32 numpy; the same ``seed``
    gives the same result. Each layer draws from its own SeedGenerator made from ``seed``
    (never from the layer's shared state), which makes concurrent calls safe. A generator
    rather than an integer seed: RandomZoom draws its height and width factors with the same
    seed argument, and an integer would make them equal."""
    if not augmenter.layers:
        return equalized
    images = keras.ops.convert_to_tensor(equalized[..., None].astype(np.float32))
    for k, layer in enumerate(augmenter.layers):
        generator = keras.random.SeedGenerator(seed * 16 + k)
        if isinstance(layer, RandomBrightnessScale):
            images = layer.apply(images, generator)
        else:
            change = layer.get_random_transformation(images, training=True, seed=generator)
            images = layer.transform_images(images, change, training=True)
    return np.asarray(keras.ops.convert_to_numpy(images))[..., 0]

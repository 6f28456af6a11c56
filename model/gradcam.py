"""Grad-CAM heatmaps for the positive class, for a whole batch in one pass.

Grad-CAM (Selvaraju et al., 2017): for a convolutional feature map ``A``
(``h x w x C``) and a class score ``y``, weight each channel by its spatially
averaged gradient ``a_c = mean_ij dy/dA_ijc``, sum the weighted channels, keep
the positive part: ``relu(sum_c a_c A_c)``. Here ``y`` is the positive class's
log-odds, computed from the logits behind the model's final softmax or sigmoid
``Dense`` layer (its gradient has the direction of the probability's gradient
but does not vanish when the prediction saturates); for any other final layer
it is the model's output for that class. Each map is divided by its maximum
(an all-zero map stays zero) and resized bilinearly to the input resolution.

The layer used by default is the last layer whose output is 4-D
(batch, height, width, channels), i.e. the last convolutional block's output
just before global pooling; for :func:`model.network.build_xception` that is
``block14_sepconv2_act`` (10 x 10 at 299 px, 3 x 3 at 71 px).

The network is split at that layer into a feature part (input -> ``A``) and a
head (``A`` -> pre-activation input of the last layer); everything after the
layer must depend on the input only through it, which holds for the default
layer of a chain of blocks ending in pooling.

Backend libraries: taking a gradient with respect to an intermediate tensor has
no Keras 3 API, so this is the clearly marked module that imports TensorFlow
(``tf.GradientTape``) or JAX (``jax.grad``), inside one small dispatch on
``keras.backend.backend()`` and only there. Other backends are refused by name.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
from skimage.transform import resize

from model.network import CLASS_NAMES, POSITIVE_CLASS

SUPPORTED_BACKENDS = ("tensorflow", "jax")


def default_layer_name(model: keras.Model) -> str:
    """Name of the last layer with a 4-D output that is not the input (the last conv block).

    Raises ValueError when the model has no such layer.
    """
    input_names = {getattr(t, "name", None) for t in model.inputs}
    for layer in reversed(model.layers):
        if isinstance(layer, keras.layers.InputLayer) or layer.name in input_names:
            continue
        output = layer.output
        if isinstance(output, list | tuple):  # a nested multi-output model is no feature map
            continue
        if len(output.shape) == 4:
            return str(layer.name)
    raise ValueError(f"model {model.name!r} has no layer with a 4-D (convolutional) output")


def positive_index_of(model: keras.Model) -> int:
    """Output unit of the positive class: 0 for one sigmoid unit, else its index in CLASS_NAMES."""
    units = int(model.output_shape[-1])
    return 0 if units == 1 else CLASS_NAMES.index(POSITIVE_CLASS)


def grad_cam(model: keras.Model, batch: np.ndarray, layer_name: str | None = None,
             class_index: int | None = None) -> np.ndarray:
    """Grad-CAM heatmaps for ``batch`` (n, H, W, channels), one forward and one backward pass.

    Returns float32 (n, H, W) in [0, 1], each map scaled so its maximum is 1 (or all zero when
    no location raises the score). ``layer_name``: the feature map to explain (default: see
    :func:`default_layer_name`); ``class_index``: the output unit (default:
    :func:`positive_index_of`). Raises ValueError for a bad batch shape, an unknown layer or
    one without a 4-D output, NotImplementedError on a backend other than TensorFlow or JAX.
    """
    return GradCam(model, layer_name, class_index)(batch)


class GradCam:
    """:func:`grad_cam` for one model, split once (the worker explains every batch with it).

    :meth:`predict` gives the model's output together with the explained layer's activations
    in the one forward pass a prediction needs anyway; :meth:`from_activations` then costs only
    the head's backward pass, so a heatmap adds little to scoring."""

    def __init__(self, model: keras.Model, layer_name: str | None = None,
                 class_index: int | None = None) -> None:
        backend = keras.backend.backend()
        if backend not in SUPPORTED_BACKENDS:
            raise NotImplementedError(f"grad_cam supports the {' and '.join(SUPPORTED_BACKENDS)} "
                                      f"backends, not {backend!r}")
        name = layer_name or default_layer_name(model)
        try:
            layer = model.get_layer(name)
        except ValueError as e:
            raise ValueError(f"model {model.name!r} has no layer named {name!r}") from e
        if isinstance(layer.output, list | tuple) or len(layer.output.shape) != 4:
            raise ValueError(f"layer {name!r} has output shape {layer.output.shape}, "
                             "not a 4-D feature map")
        index = positive_index_of(model) if class_index is None else class_index
        self.backend = backend
        self.layer_name = name
        self.input_shape = tuple(model.input_shape[1:])
        self.features, self.head, self.score = _split(model, layer, index)
        inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
        self.joint = keras.Model(inputs, [layer.output, model.output], name=f"{model.name}_joint")

    def _check(self, batch: np.ndarray) -> np.ndarray:
        if batch.ndim != 4 or tuple(batch.shape[1:]) != self.input_shape:
            raise ValueError(f"batch shape {batch.shape} does not match "
                             f"(n, {', '.join(map(str, self.input_shape))})")
        return batch.astype(np.float32, copy=False)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        activations = self.features(self._check(batch), training=False)
        return self.from_activations(activations, batch.shape[1:3])

    def predict(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the model's output, the explained layer's activations) for ``batch``, one forward
        pass (``predict_on_batch``, as :class:`model.predictor.Predictor`)."""
        activations, output = self.joint.predict_on_batch(self._check(batch))
        return np.asarray(output), np.asarray(activations)

    def from_activations(self, activations: Any, size: tuple[int, int]) -> np.ndarray:
        """Grad-CAM maps, (n, *size) float32 in [0, 1], from the explained layer's activations
        (from :meth:`predict`): the head's backward pass only."""
        gradients = _GRADIENTS[self.backend](self.head, self.score, activations)
        acts = np.asarray(keras.ops.convert_to_numpy(activations), dtype=np.float64)
        weights = np.asarray(gradients, dtype=np.float64).mean(axis=(1, 2), keepdims=True)
        cams = np.maximum((weights * acts).sum(axis=-1), 0.0)
        peaks = cams.max(axis=(1, 2), keepdims=True)
        cams = np.divide(cams, peaks, out=np.zeros_like(cams), where=peaks > 0)
        height, width = size
        return np.stack([np.clip(resize(c, (height, width), order=1, mode="edge",
                                        anti_aliasing=False), 0.0, 1.0)
                         for c in cams]).astype(np.float32)


Score = Callable[[Any], Any]
"""Maps the head's output (symbolic backend tensor) to one score per image."""


def _split(model: keras.Model, layer: keras.layers.Layer,
           index: int) -> tuple[keras.Model, keras.Model, Score]:
    """The feature model (input -> layer output), the head (layer output -> head output) and the
    score on the head output: the class's log-odds when the last layer is a softmax/sigmoid Dense."""
    last = model.layers[-1]
    activation = getattr(getattr(last, "activation", None), "__name__", "")
    logits_from_dense = isinstance(last, keras.layers.Dense) and activation in ("softmax", "sigmoid")
    head_output = last.input if logits_from_dense else model.output
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
    features = keras.Model(inputs, layer.output, name=f"{model.name}_features")
    try:
        head = keras.Model(layer.output, head_output, name=f"{model.name}_head")
    except ValueError as e:
        raise ValueError(f"the network does not depend on its input only through layer "
                         f"{layer.name!r}, so Grad-CAM cannot be taken there: {e}") from e
    ops = keras.ops

    def score(out: Any) -> Any:
        if not logits_from_dense:
            return out[:, index]
        logits = ops.matmul(out, last.kernel)
        if last.use_bias:
            logits = logits + last.bias
        if activation == "sigmoid":
            return logits[:, index]
        others = ops.concatenate([logits[:, :index], logits[:, index + 1:]], axis=1)
        return logits[:, index] - ops.logsumexp(others, axis=1)

    return features, head, score


def _tensorflow_gradients(head: keras.Model, score: Score, activations: Any) -> np.ndarray:
    """d score / d activations under TensorFlow (``tf.GradientTape``)."""
    tf = importlib.import_module("tensorflow")
    activations = tf.convert_to_tensor(activations)
    with tf.GradientTape() as tape:
        tape.watch(activations)
        total = tf.reduce_sum(score(head(activations, training=False)))
    return np.asarray(keras.ops.convert_to_numpy(tape.gradient(total, activations)))


def _jax_gradients(head: keras.Model, score: Score, activations: Any) -> np.ndarray:
    """d score / d activations under JAX (``jax.grad`` over the head's ``stateless_call``).

    The scores of different images are independent (inference mode), so the gradient of their
    sum gives every image's gradient in one pass.
    """
    jax = importlib.import_module("jax")
    trainable = [v.value for v in head.trainable_variables]
    non_trainable = [v.value for v in head.non_trainable_variables]

    def total(acts: Any) -> Any:
        out, _ = head.stateless_call(trainable, non_trainable, acts, training=False)
        return keras.ops.sum(score(out))

    return np.asarray(keras.ops.convert_to_numpy(jax.grad(total)(activations)))


_GRADIENTS: dict[str, Callable[[keras.Model, Score, Any], np.ndarray]] = {
    "tensorflow": _tensorflow_gradients,
    "jax": _jax_gradients,
}

"""Batch prediction with a loaded bundle: load once, warm up, then probabilities per image."""

from __future__ import annotations

import time
from pathlib import Path

import keras
import numpy as np
import structlog

from model.bundle import load_bundle
from model.device import describe_device

log = structlog.get_logger("opacityd.model")


class Predictor:
    """Holds one model. ``predict`` takes preprocessed arrays and returns P(positive class).

    Uses ``predict_on_batch`` (a compiled call without ``predict()``'s per-call
    overhead of 100-180 ms on this class of CPU); no XLA jit, which is slower on CPU.
    """

    def __init__(self, bundle: Path, warm_up_batch: int = 1) -> None:
        started = time.perf_counter()
        self.model, self.manifest = load_bundle(bundle)
        self.device = describe_device()
        self.positive_index = self.manifest.positive_index
        size = self.manifest.input_size
        self.input_shape = (size, size, 3)
        self.pads_batches = keras.backend.backend() == "jax"
        """Whether :meth:`padded` pads: JAX compiles the network once per batch shape."""
        if warm_up_batch:
            self.predict(np.zeros((warm_up_batch, *self.input_shape), dtype=np.float32))
        log.info("model_loaded", model=self.manifest.name, version=self.manifest.version,
                 validated=self.manifest.validated, device=self.device, input_size=size,
                 seconds=round(time.perf_counter() - started, 2))

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities of the positive class, shape (n,), for a (n, size, size, 3) batch."""
        if batch.ndim != 4 or batch.shape[1:] != self.input_shape:
            raise ValueError(f"batch shape {batch.shape} does not match (n, {self.input_shape})")
        outputs = self.model.predict_on_batch(self.padded(batch.astype(np.float32, copy=False)))
        return self.probabilities(outputs)[:len(batch)]

    def padded(self, batch: np.ndarray) -> np.ndarray:
        """``batch`` with zero images appended up to the next power of two under JAX, which
        compiles the network for each batch shape it sees: a worker then compiles
        log2(batch_size) + 1 shapes instead of one per batch size. Unchanged on the other
        backends (TensorFlow's traced function takes any batch size, PyTorch runs eagerly),
        where padding would only cost compute. The caller keeps the first ``len(batch)`` rows
        of the outputs."""
        n = len(batch)
        if not self.pads_batches or n & (n - 1) == 0:
            return batch
        filler = np.zeros(((1 << n.bit_length()) - n, *batch.shape[1:]), dtype=batch.dtype)
        return np.concatenate([batch, filler])

    def probabilities(self, outputs: np.ndarray) -> np.ndarray:
        """P(positive class), shape (n,), from the model's outputs (n, classes)."""
        return np.asarray(outputs)[:, self.positive_index].astype(np.float64)

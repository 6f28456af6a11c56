"""Which device the Keras backend computes on.

The one module in `model/` that imports backend libraries directly, and only
to describe the device for the log; the model code itself is Keras-only.
"""

from __future__ import annotations

import importlib

import keras


def describe_device() -> str:
    """E.g. ``tensorflow:CPU`` or ``jax:gpu (NVIDIA H100)``."""
    backend = keras.backend.backend()
    try:
        if backend == "tensorflow":
            tf = importlib.import_module("tensorflow")
            gpus = tf.config.list_physical_devices("GPU")
            return f"tensorflow:{'GPU x' + str(len(gpus)) if gpus else 'CPU'}"
        if backend == "jax":
            jax = importlib.import_module("jax")
            device = jax.devices()[0]
            return f"jax:{device.platform} ({getattr(device, 'device_kind', '?')})"
        if backend == "torch":
            torch = importlib.import_module("torch")
            if torch.cuda.is_available():
                return f"torch:cuda ({torch.cuda.get_device_name(0)})"
            return "torch:cpu"
    except (ImportError, RuntimeError, IndexError) as e:
        return f"{backend}:unknown ({type(e).__name__})"
    return f"{backend}:unknown"

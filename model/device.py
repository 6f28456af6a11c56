"""Which device the Keras backend computes on, and how many CPU threads it uses.

The one module in `model/` that imports backend libraries directly, only to
describe the device for the log and to size the backend's thread pools; the
model code itself is Keras-only.
"""

from __future__ import annotations

import importlib
import os

import keras

XLA_SINGLE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
"""XLA_FLAGS that make XLA's CPU code single-threaded: JAX has no setting for N threads."""


def configure_threads(intra_op: int, inter_op: int) -> dict[str, object]:
    """Size the backend's CPU thread pools. Call it before the backend computes anything
    (before a model is loaded): each backend fixes its pools at its first operation.

    ``intra_op``: threads that one operation (a convolution) is split over; ``inter_op``:
    independent operations run side by side. 0 keeps the backend's default for that pool
    (one thread per CPU). Returns what was set, for the log.

    - TensorFlow: ``tf.config.threading`` intra- and inter-op parallelism.
    - PyTorch: ``torch.set_num_threads`` and ``torch.set_num_interop_threads``.
    - JAX: XLA has no setting for a number of CPU threads. ``intra_op = 1`` makes its CPU code
      single-threaded (:data:`XLA_SINGLE_THREAD` appended to ``XLA_FLAGS``, read when JAX
      creates its CPU client); any other value leaves one thread per CPU; ``inter_op`` has no
      counterpart. On a GPU these settle only the little CPU work JAX does.

    Raises RuntimeError when the backend has already started its pools.
    """
    backend = keras.backend.backend()
    applied: dict[str, object] = {"backend": backend, "intra_op": intra_op or "default",
                                  "inter_op": inter_op or "default"}
    if backend == "tensorflow":
        tf = importlib.import_module("tensorflow")
        if intra_op:
            tf.config.threading.set_intra_op_parallelism_threads(intra_op)
        if inter_op:
            tf.config.threading.set_inter_op_parallelism_threads(inter_op)
    elif backend == "torch":
        torch = importlib.import_module("torch")
        if intra_op:
            torch.set_num_threads(intra_op)
        if inter_op:
            torch.set_num_interop_threads(inter_op)
    elif backend == "jax":
        xla_bridge = importlib.import_module("jax._src.xla_bridge")
        if intra_op == 1:
            if xla_bridge.backends_are_initialized():
                raise RuntimeError("JAX's CPU client is already running; XLA_FLAGS come too late")
            flags = os.environ.get("XLA_FLAGS", "")
            if XLA_SINGLE_THREAD not in flags:
                os.environ["XLA_FLAGS"] = f"{flags} {XLA_SINGLE_THREAD}".strip()
        else:
            applied["intra_op"] = "default (XLA sets only 1 or one per CPU)"
        applied["inter_op"] = "n/a"
    return applied


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

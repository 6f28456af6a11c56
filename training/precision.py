"""Which floating-point policy training uses: mixed precision on a GPU, float32 elsewhere.

Mixed precision computes in 16 bits and keeps the weights in float32, so checkpoints hold
float32 weights either way; evaluation and export rebuild the network in float32
(:func:`float32_network`) so the bundle the daemon serves, and the probabilities evaluation
reports, never depend on the precision training used.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import keras

from model.device import describe_device
from model.network import build_xception

POLICIES = ("auto", "float32", "mixed_float16", "mixed_bfloat16")


def accelerator_present() -> bool:
    """True when the Keras backend computes on a GPU (model.device names the device)."""
    kind = describe_device().split(":", 1)[-1].lower()
    return kind.startswith(("gpu", "cuda"))


def resolve_policy(setting: str) -> str:
    """``auto``: mixed_float16 (loss-scaled, any CUDA GPU) when a GPU is present, else float32."""
    if setting != "auto":
        return setting
    return "mixed_float16" if accelerator_present() else "float32"


@contextmanager
def precision(policy: str) -> Iterator[str]:
    """Keras's global dtype policy set to ``policy`` inside the block, restored after it."""
    before = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy(policy)
    try:
        yield policy
    finally:
        keras.mixed_precision.set_global_policy(before)


def float32_network(checkpoint: Path, input_size: int) -> keras.Model:
    """The checkpoint's weights in a float32 copy of the network (uncompiled, no optimizer)."""
    trained = keras.saving.load_model(checkpoint, compile=False)
    with precision("float32"):
        model = build_xception(input_size, weights=None, name="opacity_xception")
    model.set_weights(trained.get_weights())
    return model

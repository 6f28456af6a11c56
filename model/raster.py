"""PNG/JPG images (the training datasets) to a display image in [0, 1]."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from model.dicom_pixels import Display
from model.errors import PreprocessError, Refusal

RASTER_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})


def raster_display(path: Path, max_side: int) -> Display:
    """8/16-bit gray, or RGB holding gray (common in the Kaggle sets), to [0, 1]."""
    try:
        with Image.open(path) as img:
            if img.width > max_side or img.height > max_side:
                raise PreprocessError(Refusal.TOO_LARGE,
                                      f"{img.width}x{img.height} exceeds {max_side}x{max_side}")
            mode = img.mode
            arr = np.asarray(img)
    except PreprocessError:
        raise
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise PreprocessError(Refusal.NOT_READABLE, f"{type(e).__name__}: {e}"[:200]) from e
    notes: tuple[str, ...] = ()
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        if np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2]):
            arr = arr[..., 0]  # gray stored as RGB, common in the Kaggle sets
        else:
            notes = ("colour image converted to luminance",)
            arr = arr[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    if arr.ndim != 2:
        raise PreprocessError(Refusal.NOT_GRAYSCALE, f"image mode {mode} with shape {arr.shape}")
    scale = 65535.0 if mode.startswith("I;16") or arr.dtype == np.uint16 else 255.0
    image = np.clip(arr.astype(np.float32) / scale, 0.0, 1.0)
    if float(image.max()) - float(image.min()) < 1e-6:
        raise PreprocessError(Refusal.BLANK_IMAGE, "all pixels have the same value")
    return Display(image, notes, "raster")

"""The one pixel pipeline shared by training and inference.

source (DICOM data set or file, or PNG/JPG path)
  -> display image in [0, 1]            (model.dicom_pixels / model.raster)
  -> anti-aliased resize to the bundle's input size (aspect per the spec)
  -> skimage.exposure.equalize_hist     (the thesis's preprocessing)
  -> 3 channels, Xception scaling to [-1, 1]

The thesis equalised Kaggle's 512 px / 299 px resizes, not full-resolution
images, so equalisation comes after the resize here too; it is also 20x
cheaper there. Every failure is a :class:`PreprocessError` with a reason.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from skimage.exposure import equalize_hist
from skimage.transform import resize

from model.dicom_pixels import Display, dicom_display
from model.errors import PreprocessError, Refusal
from model.raster import RASTER_SUFFIXES, raster_display

PIPELINE_ID = "opacityd.preprocess.v1"
Aspect = Literal["stretch", "pad"]


@dataclass(frozen=True)
class PreprocessSpec:
    """Stored in the bundle manifest; training and inference build it from there."""

    input_size: int = 299
    aspect: Aspect = "stretch"
    """``stretch``: resize to a square like Kaggle's resized datasets; ``pad``: keep the
    aspect ratio and pad the short side with black after equalisation."""
    window_percent: float = 0.5
    """Robust window when the header has none: [p, 100 - p] percent of the pixels."""
    max_side: int = 8192
    pipeline: str = PIPELINE_ID

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PreprocessSpec:
        spec = cls(**data)
        if spec.pipeline != PIPELINE_ID:
            raise ValueError(f"preprocessing pipeline {spec.pipeline!r} is not {PIPELINE_ID!r}")
        if spec.aspect not in ("stretch", "pad"):
            raise ValueError(f"aspect {spec.aspect!r} is not 'stretch' or 'pad'")
        if not 71 <= spec.input_size <= 1024:
            raise ValueError(f"input_size {spec.input_size} is outside 71..1024")
        return spec


@dataclass(frozen=True)
class Preprocessed:
    array: np.ndarray
    """float32, (size, size, 3), in [-1, 1]."""
    equalized: np.ndarray
    """float32, (size, size), in [0, 1]: what the network sees, as a picture."""
    notes: tuple[str, ...]
    voi: str


def read_dicom(path: str | Path) -> Dataset:
    try:
        return pydicom.dcmread(path, force=False)
    except InvalidDicomError:
        try:
            ds = pydicom.dcmread(path, force=True)  # raw data sets without preamble/meta
        except Exception as e:  # noqa: BLE001 - pydicom raises many types on garbage
            # The type only: pydicom's messages may quote header values (patient data).
            raise PreprocessError(Refusal.NOT_READABLE, f"not a DICOM file ({type(e).__name__})") from e
        if "SOPClassUID" not in ds and "PixelData" not in ds:
            raise PreprocessError(Refusal.NOT_READABLE, "not a DICOM file") from None
        if "TransferSyntaxUID" not in ds.file_meta:
            # A bare data set (no preamble, no meta): little endian, VR as it was read.
            implicit = ds.original_encoding[0]
            ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit
                                              else ExplicitVRLittleEndian)
        return ds
    except (OSError, ValueError, EOFError) as e:
        raise PreprocessError(Refusal.NOT_READABLE, f"cannot read the file ({type(e).__name__})") from e


def load_display(source: Dataset | str | Path, spec: PreprocessSpec, *,
                 full_resolution: bool = False) -> Display:
    """The display image of a DICOM data set/file or a PNG/JPG file.

    Meant for resizing to ``spec.input_size``: JPEG 2000 is decoded at reduced
    resolution where that size allows (docs/model.md, "Reduced-resolution decoding");
    ``full_resolution`` decodes every pixel, for showing the image itself."""
    target = None if full_resolution else spec.input_size
    if isinstance(source, Dataset):
        return dicom_display(source, spec.max_side, spec.window_percent, target)
    path = Path(source)
    if path.suffix.lower() in RASTER_SUFFIXES:
        return raster_display(path, spec.max_side)
    return dicom_display(read_dicom(path), spec.max_side, spec.window_percent, target)


def _block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    """Integer-factor area averaging: a cheap, alias-free first step of a large downscale."""
    h, w = (image.shape[0] // factor) * factor, (image.shape[1] // factor) * factor
    top, left = (image.shape[0] - h) // 2, (image.shape[1] - w) // 2
    cropped = image[top:top + h, left:left + w]
    return cropped.reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3), dtype=np.float32)


def resize_antialiased(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize with anti-aliasing: block means down to within 2x, then a Gaussian-filtered resize."""
    factor = int(min(image.shape[0] / shape[0], image.shape[1] / shape[1]) // 2)
    if factor >= 2:
        image = _block_mean(image, factor)
    return resize(image, shape, order=1, anti_aliasing=True, preserve_range=True).astype(np.float32)


def network_input(equalized: np.ndarray) -> np.ndarray:
    """Equalised [0, 1] image(s) (..., h, w) to the network's (..., h, w, 3) in [-1, 1].

    The one place this scaling lives: inference and training (which caches the
    equalised images and augments them) both end here."""
    return np.repeat((np.asarray(equalized, dtype=np.float32) * 2.0 - 1.0)[..., None], 3, axis=-1)


def displayed(model_input: np.ndarray) -> np.ndarray:
    """The equalised image in [0, 1] that :func:`network_input` made ``model_input`` from (its
    first channel, scaled back), to show what the network saw."""
    return (np.asarray(model_input, dtype=np.float32)[..., 0] + 1.0) / 2.0


def to_model_input(display: Display, spec: PreprocessSpec) -> Preprocessed:
    size = spec.input_size
    h, w = display.image.shape
    if spec.aspect == "stretch":
        equalized = equalize_hist(resize_antialiased(display.image, (size, size))).astype(np.float32)
    else:
        scale = size / max(h, w)
        inner = (max(1, round(h * scale)), max(1, round(w * scale)))
        content = equalize_hist(resize_antialiased(display.image, inner)).astype(np.float32)
        equalized = np.zeros((size, size), dtype=np.float32)
        top, left = (size - inner[0]) // 2, (size - inner[1]) // 2
        equalized[top:top + inner[0], left:left + inner[1]] = content
    return Preprocessed(network_input(equalized), equalized, display.notes, display.voi)


def preprocess(source: Dataset | str | Path, spec: PreprocessSpec) -> Preprocessed:
    """Source to model input; raises :class:`PreprocessError` and nothing else."""
    try:
        return to_model_input(load_display(source, spec), spec)
    except PreprocessError:
        raise
    except MemoryError as e:
        raise PreprocessError(Refusal.TOO_LARGE, "out of memory while decoding") from e
    except Exception as e:  # noqa: BLE001 - the worker must get a reason, never a traceback
        raise PreprocessError(Refusal.CORRUPT_PIXEL_DATA, f"{type(e).__name__}: {e}"[:200]) from e

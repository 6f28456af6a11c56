"""DICOM pixel data to a display image in [0, 1] (1 = white), in the standard's order.

PS3.3 C.11 / PS3.4 N.2: stored values -> Modality LUT (Modality LUT Sequence,
or Rescale Slope/Intercept) -> VOI LUT (VOI LUT Sequence, or the first Window
Center/Width with its VOI LUT Function, or, when the header has none, a
robust percentile window) -> MONOCHROME1 inversion -> [0, 1].

All of that is a function of the stored value alone, so it is computed once
per distinct stored value (at most 65536 entries) as a lookup table and then
applied to the image with one indexing operation. That is exact, and costs
about the same for a 2500x2048 image as a single numpy pass over it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi, get_decoder

from model.errors import PreprocessError, Refusal
from model.fast_decode import fast_first_frame

GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "PALETTE COLOR")


@dataclass(frozen=True)
class Display:
    """A grayscale image ready for resizing: float32, [0, 1], 1 displayed white."""

    image: np.ndarray
    notes: tuple[str, ...] = ()
    voi: str = ""
    """How the VOI was chosen: ``window``, ``voi_lut``, ``percentile`` or ``raster``."""


def check_header(ds: Dataset, max_side: int) -> None:
    """Refuse what cannot be scored before any pixel is decoded."""
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise PreprocessError(Refusal.NO_PIXEL_DATA, "the data set has no pixel data")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError) as e:
        raise PreprocessError(Refusal.CORRUPT_PIXEL_DATA, "Rows/Columns missing or invalid") from e
    if rows > max_side or cols > max_side:
        raise PreprocessError(Refusal.TOO_LARGE, f"{cols}x{rows} exceeds {max_side}x{max_side}")
    if rows < 2 or cols < 2:
        raise PreprocessError(Refusal.CORRUPT_PIXEL_DATA, f"image is {cols}x{rows}")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if samples != 1 or photometric in COLOUR:
        raise PreprocessError(Refusal.NOT_GRAYSCALE,
                              f"{photometric or '?'} with {samples} samples per pixel")
    if photometric not in GRAYSCALE:
        raise PreprocessError(Refusal.UNSUPPORTED_PHOTOMETRIC,
                              f"photometric interpretation {photometric or '(empty)'}")


def _decoder_available(ds: Dataset) -> bool:
    """Whether any installed plugin decodes the data set's transfer syntax."""
    syntax = ds.file_meta.get("TransferSyntaxUID") if "file_meta" in ds.__dict__ else None
    if syntax is None or not syntax.is_compressed:
        return True
    try:
        return bool(get_decoder(syntax).is_available)
    except NotImplementedError:
        return False


def header_notes(ds: Dataset) -> tuple[str, ...]:
    """Header inconsistencies that decoding works around; recorded with the image's result."""
    notes: list[str] = []
    bits_stored, high_bit = ds.get("BitsStored"), ds.get("HighBit")
    if bits_stored is not None and high_bit is not None and int(high_bit) != int(bits_stored) - 1:
        notes.append(f"high_bit_inconsistent: HighBit {int(high_bit)} with BitsStored "
                     f"{int(bits_stored)}; decoded as BitsStored")
    syntax = ds.file_meta.get("TransferSyntaxUID") if "file_meta" in ds.__dict__ else None
    pixel_data = ds.get("PixelData")
    if isinstance(pixel_data, bytes) and (syntax is None or not syntax.is_compressed):
        try:
            frames = int(ds.get("NumberOfFrames", 1) or 1)
            expected = (int(ds.Rows) * int(ds.Columns) * frames
                        * int(ds.get("SamplesPerPixel", 1) or 1) * int(ds.BitsAllocated) + 7) // 8
        except (AttributeError, TypeError, ValueError):
            return tuple(notes)
        if len(pixel_data) > expected + (expected % 2):
            notes.append(f"pixel_data_longer_than_expected: {len(pixel_data)} bytes for "
                         f"{expected}; the excess was ignored")
    return tuple(notes)


def decode(ds: Dataset, target: int | None = None) -> tuple[np.ndarray, tuple[str, ...]]:
    """The first frame's stored values; notes say when frames were skipped.

    ``target``: the most pixels either side will have once resized (the network's input
    size). JPEG 2000 is then decoded at the lowest resolution that keeps twice that on
    the short side (:mod:`model.fast_decode`), so the array can be smaller than
    Rows x Columns; None decodes at full resolution.

    A transfer syntax no installed plugin decodes is ``unsupported_transfer_syntax``;
    data that a plugin for its syntax cannot decode is ``corrupt_pixel_data``."""
    if not _decoder_available(ds):
        raise PreprocessError(Refusal.UNSUPPORTED_TRANSFER_SYNTAX,
                              f"no decoder installed for {ds.file_meta.TransferSyntaxUID.name}")
    notes: tuple[str, ...] = header_notes(ds)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    fast = fast_first_frame(ds, target)
    if fast is not None:
        arr = fast
    else:
        try:
            arr = ds.pixel_array
        except Exception as e:  # noqa: BLE001 - the image's decode boundary: recorded as its refusal reason
            raise PreprocessError(Refusal.CORRUPT_PIXEL_DATA,
                                  f"{type(e).__name__} while decoding") from e
        if frames > 1:
            arr = arr[0]
    if frames > 1:
        notes += (f"multiframe: scored frame 1 of {frames}",)
    if arr.ndim != 2:
        raise PreprocessError(Refusal.NOT_GRAYSCALE, f"decoded array has shape {arr.shape}")
    return arr, notes


def _padding_mask(ds: Dataset, values: np.ndarray) -> np.ndarray:
    """True for stored values that are Pixel Padding (C.7.5.1.1.2), excluded from the window."""
    pad = ds.get("PixelPaddingValue")
    if pad is None:
        return np.zeros(values.shape, dtype=bool)
    limit = ds.get("PixelPaddingRangeLimit", pad)
    lo, hi = min(int(pad), int(limit)), max(int(pad), int(limit))
    return (values >= lo) & (values <= hi)


def _window(x: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """PS3.3 C.11.2.1.2 windowing to [0, 1]."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / max(width, 1e-6)))
    if function == "LINEAR_EXACT":
        width = max(width, 1e-6)
        return np.clip((x - center) / width + 0.5, 0.0, 1.0)
    width = max(width, 1.0)
    if width == 1.0:
        return (x > center - 0.5).astype(np.float64)
    return np.clip((x - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)


def _percentile_window(modality: np.ndarray, counts: np.ndarray, percent: float) -> tuple[float, float]:
    """A window spanning [p, 100 - p] percent of the pixels, computed symmetrically from both ends.

    Symmetric by construction, so an inverted copy of an image gets the mirrored window.
    """
    total = counts.sum()
    if total == 0:
        return float(modality.min()), float(modality.max())
    order = np.argsort(modality, kind="stable")
    sorted_values, sorted_counts = modality[order], counts[order]
    need = percent / 100.0 * total
    lo_index = int(np.searchsorted(np.cumsum(sorted_counts), need, side="left"))
    hi_index = len(sorted_counts) - 1 - int(
        np.searchsorted(np.cumsum(sorted_counts[::-1]), need, side="left"))
    lo_index = min(max(lo_index, 0), len(sorted_values) - 1)
    hi_index = min(max(hi_index, lo_index), len(sorted_values) - 1)
    return float(sorted_values[lo_index]), float(sorted_values[hi_index])


def _first(value: object) -> float:
    """The first of several windows (PS3.3 C.11.2.1.2: the first is the default)."""
    if isinstance(value, MultiValue | list | tuple):
        return float(value[0])
    return float(value)  # type: ignore[arg-type]


def display_lut(ds: Dataset, values: np.ndarray, counts: np.ndarray, percent: float
                ) -> tuple[np.ndarray, str]:
    """Map each stored value in ``values`` to [0, 1] display; ``counts`` is its pixel count."""
    modality = np.asarray(apply_modality_lut(values.copy(), ds), dtype=np.float64)
    valid = ~_padding_mask(ds, values)
    if ds.get("VOILUTSequence"):
        voi = np.asarray(apply_voi(np.rint(modality).astype(np.int64), ds), dtype=np.float64)
        lo, hi = float(voi.min()), float(voi.max())
        out = (voi - lo) / (hi - lo) if hi > lo else np.zeros_like(voi)
        how = "voi_lut"
    elif "WindowCenter" in ds and "WindowWidth" in ds and ds.WindowCenter is not None:
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
        out = _window(modality, _first(ds.WindowCenter), _first(ds.WindowWidth), function)
        how = "window"
    else:
        lo, hi = _percentile_window(modality[valid], counts[valid], percent)
        out = np.clip((modality - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(modality)
        how = "percentile"
    if str(ds.PhotometricInterpretation).strip().upper() == "MONOCHROME1":
        out = 1.0 - out
    out[~valid] = 0.0
    return out.astype(np.float32), how


def dicom_display(ds: Dataset, max_side: int, percent: float, target: int | None = None) -> Display:
    """Decode ``ds`` and apply Modality LUT, VOI, and MONOCHROME1 inversion.

    ``target``: the most pixels either side will have once resized (None: kept at full
    resolution); JPEG 2000 may then be decoded smaller, see :func:`decode`."""
    check_header(ds, max_side)
    arr, notes = decode(ds, target)
    if arr.dtype.kind == "f":
        # Float Pixel Data has no stored-value LUT; window it directly.
        flat = np.nan_to_num(arr.astype(np.float64))
        lo, hi = np.percentile(flat, [percent, 100 - percent])
        image = np.clip((flat - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(flat)
        if str(ds.PhotometricInterpretation).strip().upper() == "MONOCHROME1":
            image = 1.0 - image
        return Display(image.astype(np.float32), notes, "percentile")
    lo_value, hi_value = int(arr.min()), int(arr.max())
    if hi_value - lo_value > 2**20:
        raise PreprocessError(Refusal.CORRUPT_PIXEL_DATA, f"stored value range {lo_value}..{hi_value}")
    index = (arr.astype(np.int64) - lo_value) if lo_value != 0 or arr.dtype.kind != "u" else arr
    counts = np.bincount(index.ravel(), minlength=hi_value - lo_value + 1)
    values = np.arange(lo_value, hi_value + 1, dtype=np.int64)
    lut, how = display_lut(ds, values, counts, percent)
    image = lut[index]
    if float(image.max()) - float(image.min()) < 1e-6:
        raise PreprocessError(Refusal.BLANK_IMAGE, "all pixels have the same value after windowing")
    return Display(image, notes, how)

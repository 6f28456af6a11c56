"""The first frame of JPEG 2000, JPEG lossless and JPEG-LS pixel data, faster than pydicom's plugins.

- JPEG 2000 (and HTJ2K) when the image will be scaled down: decoded at reduced
  resolution, OpenJPEG's reduce factor, through Pillow (imagecodecs and
  pylibjpeg-openjpeg do not pass it on): the ``r`` finest wavelet levels are
  skipped, so each side is ``ceil(n / 2**r)`` and the decode costs about
  ``4**-r`` of the full one. What is skipped is detail finer than the resize
  keeps: the LL band at level ``r`` is the codestream's own low-pass image,
  decimated by ``2**r``. Pillow sets no thread count; OpenJPEG then takes it
  from ``OPJ_NUM_THREADS`` in the environment (a number or ``ALL_CPUS``), one
  thread without it. The worker sets it (:func:`set_decoder_threads`) to the CPUs
  per preprocessing thread: 226 -> 124 ms for a 2500x2048 image at reduce 1 with
  2 threads instead of 1 (2-vCPU VM).
- JPEG 2000 at full resolution: imagecodecs' OpenJPEG with several threads.
- JPEG lossless (libjpeg-turbo) and JPEG-LS (CharLS), both through
  imagecodecs: the same stored values as pydicom's plugins, several times faster.

Every function here returns ``None`` where it does not apply or its decoder
fails; the caller then decodes through pydicom as before, so refusals
(``corrupt_pixel_data`` and the rest) keep their meaning. Only the clean case
is taken: one component, the codestream's precision equal to Bits Stored (for
JPEG lossless and JPEG-LS: from Bits Stored to Bits Allocated), unsigned (JPEG
2000: its sign equal to Pixel Representation), its size equal to Rows x Columns.
"""

from __future__ import annotations

import io
import math
import os
import struct
from dataclasses import dataclass

import numpy as np
import structlog
from PIL import Image, Jpeg2KImagePlugin
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
)

try:
    import imagecodecs
except ImportError:  # a declared dependency; should it be missing, pydicom's plugins decode
    # mypy types the name as the module; None is its "not installed" value here
    imagecodecs = None  # type: ignore[assignment]

log = structlog.get_logger("opacityd.model")

J2K_SYNTAXES = frozenset({JPEG2000Lossless, JPEG2000, HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K})
JPEG_LOSSLESS_SYNTAXES = frozenset({JPEGLossless, JPEGLosslessSV1})
JPEG_LS_SYNTAXES = frozenset({JPEGLSLossless, JPEGLSNearLossless})

REDUCE_MARGIN = 2
"""A reduced image keeps its short side at least this many times the target size, so the
resize still averages two or more decoded pixels per output pixel on each axis. One
level further (margin 1) measured two to three times the difference to the full decode;
the bounds are in docs/model.md ("Reduced-resolution decoding") and
tests/test_fast_decode.py."""

_SOC_SIZ = b"\xff\x4f\xff\x51"
_COD = 0xFF52
_SOT = 0xFF90
_JPEG_SOF = {0xFFC3, 0xFFF7}
"""Lossless JPEG (SOF3) and JPEG-LS (SOF55) frame headers."""


@dataclass(frozen=True)
class Codestream:
    """What a frame's header says about its one component."""

    rows: int
    cols: int
    precision: int
    signed: bool
    levels: int = 0
    """JPEG 2000 only: wavelet decomposition levels in the main header's COD."""


def reduce_level(rows: int, cols: int, target: int | None, levels: int) -> int:
    """The largest reduce factor ``r <= levels`` whose image keeps its short side at least
    ``REDUCE_MARGIN * target``; 0 (full resolution) when ``target`` is None."""
    if target is None or target <= 0:
        return 0
    room = min(rows, cols) / (REDUCE_MARGIN * target)
    return max(0, min(levels, math.floor(math.log2(room)) if room >= 1 else 0))


def _pillow_reduces_like_openjpeg(side: int, reduce: int) -> bool:
    """Whether Pillow sizes a side reduced by ``2**reduce`` as OpenJPEG decodes it.

    Pillow (13.0) rounds ``side / 2**reduce`` where OpenJPEG takes the ceiling, and refuses
    the decoded tile ("broken data stream") where the two differ, e.g. 2049 at reduce 2."""
    power = 1 << reduce
    return (side + (power >> 1)) // power == -(-side // power)


OPJ_THREADS = "OPJ_NUM_THREADS"
"""OpenJPEG's thread count, read from the environment each time Pillow creates a decoder."""


def cpus() -> int:
    """The CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def set_decoder_threads(threads: int) -> int:
    """Threads for one JPEG 2000 decode, for both decoders (Pillow's OpenJPEG reads
    :data:`OPJ_THREADS`; imagecodecs is given it). Call once at start-up, before decoding
    threads run; a value the operator put in the environment is kept. Returns the count."""
    os.environ.setdefault(OPJ_THREADS, str(max(1, threads)))
    return default_threads()


def default_threads() -> int:
    """Decoder threads: :data:`OPJ_THREADS` when set (by :func:`set_decoder_threads` or the
    operator), else every CPU this process may run on."""
    value = os.environ.get(OPJ_THREADS, "")
    return int(value) if value.isdigit() and int(value) > 0 else cpus()


def j2k_header(frame: bytes) -> Codestream | None:
    """SIZ and COD of a raw JPEG 2000 codestream (ISO 15444-1 A.5.1, A.6.1); None if malformed."""
    if not frame.startswith(_SOC_SIZ) or len(frame) < 43:
        return None
    (length,) = struct.unpack(">H", frame[4:6])
    xsiz, ysiz, xosiz, yosiz = struct.unpack(">4I", frame[8:24])
    (components,) = struct.unpack(">H", frame[40:42])
    if components != 1 or length != 38 + 3 * components:
        return None
    ssiz = frame[42]
    position, levels = 4 + length, None
    while position + 4 <= len(frame):
        marker, size = struct.unpack(">HH", frame[position:position + 4])
        if marker == _SOT or marker >> 8 != 0xFF:
            break
        if marker == _COD and position + 4 + 6 <= len(frame):
            levels = frame[position + 4 + 5]
            break
        position += 2 + size
    if levels is None:
        return None
    return Codestream(rows=ysiz - yosiz, cols=xsiz - xosiz, precision=(ssiz & 0x7F) + 1,
                      signed=bool(ssiz & 0x80), levels=levels)


def jpeg_header(frame: bytes) -> Codestream | None:
    """The SOF3 or SOF55 frame header of a lossless JPEG or JPEG-LS frame; None if malformed."""
    if not frame.startswith(b"\xff\xd8"):
        return None
    position = 2
    while position + 4 <= len(frame):
        marker, size = struct.unpack(">HH", frame[position:position + 4])
        if marker >> 8 != 0xFF or marker == 0xFFDA:
            return None
        if marker in _JPEG_SOF and position + 10 <= len(frame):
            precision = frame[position + 4]
            rows, cols = struct.unpack(">HH", frame[position + 5:position + 9])
            if frame[position + 9] != 1:
                return None
            return Codestream(rows=rows, cols=cols, precision=precision, signed=False)
        position += 2 + size
    return None


def first_frame_bytes(ds: Dataset) -> bytes:
    """The first frame's encoded bytes from encapsulated Pixel Data (its fragments joined)."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    extended = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        extended = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    return get_frame(ds.PixelData, 0, number_of_frames=frames, extended_offsets=extended)


def _fits(ds: Dataset, header: Codestream, *, precision_above_bits_stored: bool = False) -> bool:
    """Whether the frame header agrees with the data set's, so the result is what pydicom gives.

    ``precision_above_bits_stored``: a precision from Bits Stored up to Bits Allocated is
    taken too (DCMTK writes lossless JPEG of 12-bit data at precision 16)."""
    try:
        bits_allocated, bits_stored = int(ds.BitsAllocated), int(ds.BitsStored)
        precision_ok = (bits_stored <= header.precision if precision_above_bits_stored
                        else header.precision == bits_stored)
        return (header.rows == int(ds.Rows) and header.cols == int(ds.Columns) and precision_ok
                and header.signed == bool(int(ds.get("PixelRepresentation", 0) or 0))
                and bits_allocated in (8, 16) and header.precision <= bits_allocated)
    except (AttributeError, TypeError, ValueError):
        return False


def _stored_dtype(ds: Dataset) -> np.dtype:
    """What pydicom returns for this Bits Allocated and Pixel Representation."""
    signed = bool(int(ds.get("PixelRepresentation", 0) or 0))
    bits = int(ds.BitsAllocated)
    return np.dtype(f"{'i' if signed else 'u'}{bits // 8}")


def _pillow_j2k(frame: bytes, header: Codestream, reduce: int) -> np.ndarray:
    """Decode with OpenJPEG through Pillow at ``reduce``; undo Pillow's scaling to 8/16 bits.

    Pillow shifts a ``p``-bit sample left to fill its 8 or 16 bit mode and adds
    ``2**(p-1)`` to signed ones; both are undone exactly here."""
    with Image.open(io.BytesIO(frame), formats=["JPEG2000"]) as im:
        if not isinstance(im, Jpeg2KImagePlugin.Jpeg2KImageFile):
            raise ValueError(f"Pillow opened the codestream as {type(im).__name__}")
        im.reduce = reduce
        im.load()
        raw = np.asarray(im)
    container = 8 if raw.dtype.itemsize == 1 else 16
    values = raw.astype(np.int32) >> (container - header.precision)
    if header.signed:
        values -= 1 << (header.precision - 1)
    return values


def decode_j2k(ds: Dataset, target: int | None) -> np.ndarray | None:
    """The first frame of a JPEG 2000 data set, reduced as far as ``target`` allows."""
    frame = first_frame_bytes(ds)
    header = j2k_header(frame)
    if header is None or not _fits(ds, header):
        return None
    reduce = reduce_level(header.rows, header.cols, target, header.levels)
    while reduce and not (_pillow_reduces_like_openjpeg(header.rows, reduce)
                          and _pillow_reduces_like_openjpeg(header.cols, reduce)):
        reduce -= 1
    if reduce == 0:
        if imagecodecs is None:
            return None
        values = imagecodecs.jpeg2k_decode(frame, numthreads=default_threads())
    else:
        values = _pillow_j2k(frame, header, reduce)
    expected = (-(-header.rows // 2**reduce), -(-header.cols // 2**reduce))
    if values.shape != expected:
        raise ValueError(f"decoded shape {values.shape}, expected {expected} at reduce {reduce}")
    return values.astype(_stored_dtype(ds), copy=False)


def decode_jpeg(ds: Dataset) -> np.ndarray | None:
    """The first frame of a lossless JPEG or JPEG-LS data set (unsigned data only)."""
    if imagecodecs is None or int(ds.get("PixelRepresentation", 0) or 0) != 0:
        return None
    frame = first_frame_bytes(ds)
    header = jpeg_header(frame)
    if header is None or not _fits(ds, header, precision_above_bits_stored=True):
        return None
    if ds.file_meta.TransferSyntaxUID in JPEG_LOSSLESS_SYNTAXES:
        # pydicom clears the bits above Bits Stored of lossless JPEG (not of JPEG-LS)
        values = imagecodecs.jpeg8_decode(frame) & ((1 << int(ds.BitsStored)) - 1)
    else:
        values = imagecodecs.jpegls_decode(frame)
    if values.shape != (int(ds.Rows), int(ds.Columns)):
        raise ValueError(f"decoded shape {values.shape}, expected {int(ds.Rows)}x{int(ds.Columns)}")
    return values.astype(_stored_dtype(ds), copy=False)


def fast_first_frame(ds: Dataset, target: int | None) -> np.ndarray | None:
    """The first frame's stored values by the faster decoders, or None: not one of their
    syntaxes, a header they do not take, or a decoder error (then pydicom decodes it)."""
    syntax = ds.file_meta.get("TransferSyntaxUID") if "file_meta" in ds.__dict__ else None
    if syntax is None or "PixelData" not in ds:
        return None
    syntax = UID(syntax)
    try:
        if syntax in J2K_SYNTAXES:
            return decode_j2k(ds, target)
        if syntax in JPEG_LOSSLESS_SYNTAXES | JPEG_LS_SYNTAXES:
            return decode_jpeg(ds)
    except (RuntimeError, ValueError, OSError, struct.error) as e:
        # RuntimeError: imagecodecs' codec errors; OSError/ValueError: Pillow's and pydicom's
        # encapsulation parser. pydicom decodes the frame again and refuses it if it must.
        log.info("fast_decode_failed", transfer_syntax=str(syntax), error=type(e).__name__)
    return None

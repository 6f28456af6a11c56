"""Fast decoding (model/fast_decode.py): JPEG 2000 at reduced resolution stays within the
documented bounds of the full decode, on the network input and on a trained toy bundle's
probability; JPEG lossless, JPEG-LS and full-resolution JPEG 2000 give pydicom's stored
values exactly; damaged data is refused as before.

The bounds (docs/model.md, "Reduced-resolution decoding") were measured at reduce 1, the
level REDUCE_MARGIN = 2 gives a 2500x2048 image for a 299 px network: max |Δ input|
0.17-0.20, mean 0.0028-0.0041, |Δp| up to 0.014. One level further (REDUCE_MARGIN = 1,
reduce 2) measured 0.42-0.61, 0.008-0.012 and up to 0.038, beyond each bound, so each
assertion can fail."""

from __future__ import annotations

import copy
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    JPEG2000Lossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
)
from skimage.transform import resize
from structlog.testing import capture_logs

import model.fast_decode as fast_decode
from model.errors import PreprocessError, Refusal
from model.fast_decode import decode_j2k, decode_jpeg, reduce_level
from model.preprocess import PreprocessSpec, load_display, preprocess
from tests.conftest import DICOM_DIR, SHARED_DATA
from tests.factories import make_dx
from tests.toy_bundle import ToyBundle, train_toy_bundle

SPEC = PreprocessSpec(input_size=299)
MAX_INPUT_DIFF = 0.30
"""Largest |Δ| of one network input value (range [-1, 1]), reduced vs full decode."""
MEAN_INPUT_DIFF = 0.006
MAX_PROBABILITY_DIFF = 0.03
"""|Δp| of the toy bundle, reduced vs full decode."""
ORTHANC = "orthanc_Issue44_Monochrome1-Jpeg.dcm"
SIIM = "siimacr_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
NIH = "nihgcp_1.3.6.1.4.1.11129.5.5.110503645592756492463169821050252582267888.dcm"
DCMCJPEG = "/usr/bin/dcmcjpeg"


@contextmanager
def _pydicom_only() -> Iterator[None]:
    """Decode as before this module existed: pydicom's plugins, every pixel."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("model.dicom_pixels.fast_first_frame", lambda ds, target: None)
        yield


def _stored(ds: Dataset, pixels: np.ndarray, bits: int, window: tuple[float, float] | None) -> Dataset:
    """``ds`` with ``pixels`` as its uncompressed ``bits``-bit stored values."""
    ds = copy.deepcopy(ds)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    for keyword in ("WindowCenter", "WindowWidth", "VOILUTFunction"):
        if keyword in ds:
            delattr(ds, keyword)
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    return ds


def _real_size_radiographs() -> dict[str, Dataset]:
    """12-bit radiographs at detector size, uncompressed.

    The Orthanc CR (2446x2010, MONOCHROME1, real) with its 8-bit values spread to 12 bits,
    with its window and without (the percentile window, which counts decoded pixels); two
    1024 px NIH radiographs scaled to 2500x2048 with detector-like noise added."""
    if not DICOM_DIR.is_dir():
        pytest.skip(f"real DICOM files not available at {DICOM_DIR}")
    rng = np.random.default_rng(5)
    cr = pydicom.dcmread(DICOM_DIR / ORTHANC)
    twelve = cr.pixel_array.astype(np.uint16) * 16 + rng.integers(0, 16, cr.pixel_array.shape, np.uint16)
    cases = {"orthanc-cr-window": _stored(cr, twelve, 12, (114.5 * 16 + 8, 255 * 16)),
             "orthanc-cr-percentile": _stored(cr, twelve, 12, None)}
    for label, name in (("siim-scaled", SIIM), ("nih-scaled", NIH)):
        ds = pydicom.dcmread(DICOM_DIR / name)
        scaled = resize(ds.pixel_array.astype(np.float32), (2500, 2048), order=3) * 16
        noisy = np.clip(scaled + rng.normal(0, 12, scaled.shape), 0, 4095)
        cases[label] = _stored(ds, noisy, 12, None)
    return cases


def _encoded(ds: Dataset, syntax: str, tmp: Path) -> Dataset:
    """``ds`` in ``syntax``: JPEG lossless by DCMTK's dcmcjpeg (pydicom has no encoder for it,
    and DCMTK writes 12-bit data at precision 16 as many senders do), the rest by pydicom."""
    if syntax in (pydicom.uid.JPEGLossless, pydicom.uid.JPEGLosslessSV1):
        if not Path(DCMCJPEG).exists():
            pytest.skip(f"{DCMCJPEG} not installed (apt-get install dcmtk)")
        source, target = tmp / "in.dcm", tmp / "out.dcm"
        ds.save_as(source, enforce_file_format=True)
        option = "+e1" if syntax == pydicom.uid.JPEGLosslessSV1 else "+el"
        subprocess.run([DCMCJPEG, option, str(source), str(target)], check=True, capture_output=True)
        out = pydicom.dcmread(target)
        assert out.file_meta.TransferSyntaxUID == syntax
        return out
    out = copy.deepcopy(ds)
    out.compress(syntax, **({"jls_error": 2} if syntax == JPEGLSNearLossless else {}))
    return out


@pytest.fixture(scope="module")
def radiographs() -> dict[str, Dataset]:
    return _real_size_radiographs()


@pytest.fixture(scope="module")
def j2k_inputs(radiographs: dict[str, Dataset]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per case: the network input from the full pydicom decode, and from the reduced one."""
    inputs = {}
    for label, ds in radiographs.items():
        j2k = copy.deepcopy(ds)
        j2k.compress(JPEG2000Lossless)
        with _pydicom_only():
            full = preprocess(copy.deepcopy(j2k), SPEC).array
        inputs[label] = (full, preprocess(j2k, SPEC).array)
    return inputs


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> ToyBundle:
    labelled = SHARED_DATA / "labelled"
    if not (labelled / "labels.csv").is_file():
        pytest.skip(f"labelled radiographs not available at {labelled}")
    return train_toy_bundle(labelled, tmp_path_factory.mktemp("toy"), size=SPEC.input_size)


def test_a_2500x2048_jpeg2000_is_decoded_at_half_resolution_for_a_299_px_network(
        radiographs: dict[str, Dataset]) -> None:
    ds = copy.deepcopy(radiographs["siim-scaled"])
    ds.compress(JPEG2000Lossless)
    assert load_display(ds, SPEC).image.shape == (1250, 1024)
    assert load_display(ds, SPEC, full_resolution=True).image.shape == (2500, 2048)


@pytest.mark.parametrize("case", ["orthanc-cr-window", "orthanc-cr-percentile", "siim-scaled", "nih-scaled"])
def test_reduced_jpeg2000_network_input_stays_within_the_bound_of_the_full_decode(
        j2k_inputs: dict[str, tuple[np.ndarray, np.ndarray]], case: str) -> None:
    full, reduced = j2k_inputs[case]
    diff = np.abs(full - reduced)
    assert float(diff.max()) <= MAX_INPUT_DIFF, f"max |Δ input| {diff.max():.3f}"
    assert float(diff.mean()) <= MEAN_INPUT_DIFF, f"mean |Δ input| {diff.mean():.4f}"


def test_reduced_jpeg2000_moves_a_trained_toy_bundles_probability_within_the_bound(
        j2k_inputs: dict[str, tuple[np.ndarray, np.ndarray]], toy: ToyBundle) -> None:
    from model.predictor import Predictor

    assert toy.held_out_accuracy >= 0.65, (
        f"the toy network did not learn ({toy.held_out_accuracy:.2f} on {toy.held_out_count}): "
        "its probabilities would not show a change of input")
    predictor = Predictor(toy.path)
    full = predictor.predict(np.stack([pair[0] for pair in j2k_inputs.values()]))
    reduced = predictor.predict(np.stack([pair[1] for pair in j2k_inputs.values()]))
    assert float(np.ptp(full)) > 0.1, f"the toy bundle gives one answer for every image: {full}"
    worst = float(np.abs(full - reduced).max())
    assert worst <= MAX_PROBABILITY_DIFF, f"|Δp| {worst:.4f} (full {full}, reduced {reduced})"


@pytest.mark.parametrize("syntax", [pydicom.uid.JPEGLosslessSV1, JPEGLSLossless])
def test_jpeg_lossless_and_jpeg_ls_give_the_full_decodes_input_and_probability_exactly(
        radiographs: dict[str, Dataset], toy: ToyBundle, tmp_path: Path, syntax: str) -> None:
    from model.predictor import Predictor

    ds = _encoded(radiographs["orthanc-cr-percentile"], syntax, tmp_path)
    assert decode_jpeg(copy.deepcopy(ds)) is not None, "the fast decoder did not take the image"
    with _pydicom_only():
        full = preprocess(copy.deepcopy(ds), SPEC).array
    fast = preprocess(ds, SPEC).array
    assert float(np.abs(full - fast).max()) == 0.0
    predictor = Predictor(toy.path)
    assert float(np.abs(predictor.predict(full[None]) - predictor.predict(fast[None]))[0]) == 0.0


def _synthetic(rows: int, cols: int, bits: int, signed: bool, seed: int = 0) -> Dataset:
    """Smooth structure plus noise over the whole ``bits``-bit range (signed: two's complement)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:cols]
    body = (np.sin(xx / 17.0) + np.cos(yy / 23.0) + 2.0) / 4.0
    top = 2**bits - 1
    values = np.clip(body * top + rng.normal(0, top / 60, body.shape), 0, top).astype(np.int64)
    if signed:
        values -= 2 ** (bits - 1)
    ds = make_dx(rows, cols, bits_stored=bits)
    ds.BitsAllocated = 8 if bits <= 8 else 16
    ds.PixelRepresentation = int(signed)
    dtype = f"{'i' if signed else 'u'}{ds.BitsAllocated // 8}"
    ds.PixelData = values.astype(dtype).tobytes()
    return ds


@pytest.mark.parametrize(("bits", "signed"), [(8, False), (12, False), (12, True), (16, False), (16, True)])
def test_full_resolution_jpeg2000_gives_pydicoms_stored_values(bits: int, signed: bool) -> None:
    ds = _synthetic(203, 157, bits, signed)
    ds.compress(JPEG2000Lossless)
    fast = decode_j2k(copy.deepcopy(ds), target=None)
    assert fast is not None, "the fast decoder did not take the image"
    expected = ds.pixel_array
    assert fast.dtype == expected.dtype
    np.testing.assert_array_equal(fast, expected)


@pytest.mark.parametrize(("bits", "signed"), [(8, False), (12, False), (12, True), (16, False), (16, True)])
def test_pillows_openjpeg_path_at_reduce_0_gives_pydicoms_stored_values(bits: int, signed: bool) -> None:
    """The path that decodes reduced images undoes Pillow's scaling exactly (checked at reduce 0,
    where pydicom decodes the same pixels)."""
    ds = _synthetic(203, 157, bits, signed)
    ds.compress(JPEG2000Lossless)
    frame = fast_decode.first_frame_bytes(ds)
    header = fast_decode.j2k_header(frame)
    assert header is not None and header.precision == bits and header.signed == signed
    np.testing.assert_array_equal(fast_decode._pillow_j2k(frame, header, 0), ds.pixel_array)


def test_htj2k_is_decoded_reduced_and_in_full_like_pydicom() -> None:
    imagecodecs = pytest.importorskip("imagecodecs")
    ds = _synthetic(1031, 1029, 16, False)
    values = np.frombuffer(ds.PixelData, dtype=np.uint16).reshape(1031, 1029)
    ds.file_meta.TransferSyntaxUID = HTJ2KLossless
    ds.PixelData = encapsulate([imagecodecs.htj2k_encode(values)])
    ds["PixelData"].VR = "OB"
    full = decode_j2k(copy.deepcopy(ds), target=None)
    assert full is not None
    np.testing.assert_array_equal(full, ds.pixel_array)
    # 1029 / 256 would allow reduce 2, but Pillow rounds 1029 / 4 down where OpenJPEG
    # rounds up, so reduce 1 it is.
    reduced = decode_j2k(ds, target=128)
    assert reduced is not None and reduced.shape == (516, 515)


@pytest.mark.parametrize(("syntax", "bits"), [
    (pydicom.uid.JPEGLosslessSV1, 8), (pydicom.uid.JPEGLosslessSV1, 12), (pydicom.uid.JPEGLosslessSV1, 16),
    (pydicom.uid.JPEGLossless, 12), (JPEGLSLossless, 8), (JPEGLSLossless, 12), (JPEGLSLossless, 16),
    (JPEGLSNearLossless, 12),
])
def test_jpeg_lossless_and_jpeg_ls_decoders_give_pydicoms_stored_values(
        tmp_path: Path, syntax: str, bits: int) -> None:
    ds = _encoded(_synthetic(203, 157, bits, False), syntax, tmp_path)
    fast = decode_jpeg(copy.deepcopy(ds))
    assert fast is not None, "the fast decoder did not take the image"
    expected = ds.pixel_array
    assert fast.dtype == expected.dtype
    np.testing.assert_array_equal(fast, expected)


def test_signed_jpeg_ls_is_left_to_pydicom() -> None:
    ds = _synthetic(64, 64, 12, True)
    ds.compress(JPEGLSLossless)
    assert decode_jpeg(ds) is None
    assert preprocess(ds, PreprocessSpec(input_size=71)).array.shape == (71, 71, 3)


@pytest.mark.parametrize("target", [None, 71])
def test_a_damaged_jpeg2000_codestream_is_still_refused_as_corrupt_pixel_data(target: int | None) -> None:
    ds = _synthetic(512, 512, 12, False)
    ds.compress(JPEG2000Lossless)
    frame = fast_decode.first_frame_bytes(ds)
    damaged = frame[:200] + bytes(range(256)) * 40  # headers intact, tile data garbage and short
    ds.PixelData = encapsulate([damaged])
    spec = PreprocessSpec(input_size=target or 512)
    with capture_logs() as logs, pytest.raises(PreprocessError) as info:
        preprocess(ds, spec)
    assert info.value.reason is Refusal.CORRUPT_PIXEL_DATA
    assert "while decoding" in info.value.detail and "Traceback" not in info.value.detail
    assert [e["event"] for e in logs] == ["fast_decode_failed"]


def test_lossy_jpeg2000_and_multiframe_take_the_reduced_path_for_frame_1() -> None:
    frames = [np.frombuffer(_synthetic(600, 520, 12, False, seed).PixelData, np.uint16).reshape(600, 520)
              for seed in (1, 2)]
    ds = _synthetic(600, 520, 12, False)
    ds.NumberOfFrames = 2
    ds.PixelData = np.stack(frames).tobytes()
    ds.compress(JPEG2000, j2k_cr=[20])
    single = copy.deepcopy(ds)
    single.NumberOfFrames = 1
    single.PixelData = encapsulate([fast_decode.first_frame_bytes(ds)])
    spec = PreprocessSpec(input_size=128)
    many, one = load_display(ds, spec), load_display(single, spec)
    assert many.image.shape == (300, 260)
    assert many.notes == ("multiframe: scored frame 1 of 2",)
    np.testing.assert_array_equal(many.image, one.image)


@pytest.mark.parametrize(("rows", "cols", "target", "expected"), [
    (2500, 2048, 299, (1250, 1024)),   # 2048 / 299 = 6.8: reduce 1 keeps 1024 >= 2 x 299
    (2500, 2048, 1024, (2500, 2048)),  # a target that needs every pixel
    (1024, 1024, 299, (1024, 1024)),   # 512 would be under 2 x 299
    (2500, 2048, None, (2500, 2048)),  # no target: full resolution
])
def test_a_target_that_needs_full_resolution_decodes_every_pixel(
        rows: int, cols: int, target: int | None, expected: tuple[int, int]) -> None:
    ds = _synthetic(rows, cols, 12, False)
    ds.compress(JPEG2000Lossless)
    decoded = decode_j2k(ds, target)
    assert decoded is not None and decoded.shape == expected


def test_reduce_level_keeps_twice_the_target_and_the_codestreams_levels() -> None:
    assert reduce_level(2500, 2048, 299, levels=5) == 1
    assert reduce_level(4096, 4096, 256, levels=5) == 3   # 512 >= 2 x 256 > 256
    assert reduce_level(4096, 4096, 71, levels=5) == 4    # 256 >= 2 x 71 > 128
    assert reduce_level(4096, 4096, 71, levels=3) == 3    # no further than the codestream's levels
    assert reduce_level(400, 400, 299, levels=5) == 0
    assert reduce_level(2500, 2048, None, levels=5) == 0


def test_sides_pillow_would_size_wrongly_are_decoded_one_level_larger_not_refused() -> None:
    ds = _synthetic(1025, 1029, 12, False)
    ds.compress(JPEG2000Lossless)
    # reduce 3 and 2 would fit 2 x 64, but Pillow rounds 1025 / 8 and 1025 / 4 down.
    assert reduce_level(1025, 1029, 64, levels=5) == 3
    with capture_logs() as logs:
        decoded = decode_j2k(ds, target=64)
    assert decoded is not None and decoded.shape == (513, 515)
    assert logs == []

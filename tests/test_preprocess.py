"""The pixel pipeline: equivalences, refusal reasons, and what real chest files look like."""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import JPEG2000Lossless

from model.errors import PreprocessError, Refusal
from model.preprocess import Preprocessed, PreprocessSpec, load_display, preprocess, to_model_input
from tests.conftest import DICOM_DIR, SHARED_DATA
from tests.factories import make_dx
from tests.golden import GOLDEN_FILE, fingerprint

SPEC = PreprocessSpec(input_size=128)
FUJI = "fodicom_CR-MONO1-10-chest.dcm"
NIH = "nihgcp_1.3.6.1.4.1.11129.5.5.110503645592756492463169821050252582267888.dcm"
SIIM = "siimacr_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
ORTHANC = "orthanc_Issue44_Monochrome1-Jpeg.dcm"
FAKE_MONO1 = "txv_Fake_MONOHR1_derived-from-siimacr.dcm"


def _same(a: Preprocessed, b: Preprocessed, mean_tol: float = 0.0, max_tol: float = 0.0) -> None:
    diff = np.abs(a.array - b.array)
    assert a.array.shape == b.array.shape
    assert float(diff.mean()) <= mean_tol and float(diff.max()) <= max_tol, (
        f"mean diff {diff.mean():.5f}, max diff {diff.max():.5f}")


def _chest_like(ds: Dataset, seed: int = 0, bits: int = 12) -> Dataset:
    """A synthetic radiograph-like image: smooth structure plus noise, ``bits`` stored."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:256, 0:200]
    body = (np.sin(xx / 17.0) + np.cos(yy / 23.0) + 2.5) / 5.0
    pixels = body * (2**bits - 1) * 0.8 + rng.normal(0, 40, body.shape)
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsStored, ds.HighBit = bits, bits - 1
    ds.PixelData = np.clip(pixels, 0, 2**bits - 1).astype(np.uint16).tobytes()
    return ds


@pytest.mark.parametrize(("original", "copies"), [
    (FUJI, ["derived/DERIVED_fuji-cr-mono1-10_part10-explicit.dcm",
            "derived/DERIVED_fuji-cr-mono1-10_rle.dcm",
            "derived/DERIVED_fuji-cr-mono1-10_j2k-lossless.dcm"]),
    (NIH, ["derived/DERIVED_nihgcp_deflated.dcm", "derived/DERIVED_nihgcp_rle.dcm",
           "derived/DERIVED_nihgcp_j2k-lossless.dcm"]),
])
def test_real_lossless_encodings_give_the_same_input(shared_dicom: Path, original: str,
                                                     copies: list[str]) -> None:
    reference = preprocess(shared_dicom / original, SPEC)
    for name in copies:
        # Every pixel decoded: JPEG 2000 is otherwise decoded at reduced resolution where the
        # input size allows (bounded in tests/test_fast_decode.py, pinned by the golden file).
        _same(reference, to_model_input(load_display(shared_dicom / name, SPEC, full_resolution=True), SPEC))


def test_real_monochrome1_and_its_monochrome2_inversion_give_the_same_input(shared_dicom: Path) -> None:
    mono2 = preprocess(shared_dicom / SIIM, SPEC)
    mono1 = preprocess(shared_dicom / "derived/DERIVED_siimacr_true-mono1_explicit.dcm", SPEC)
    # The derived copy was decoded from lossy JPEG by another decoder: allow +-1 grey level.
    _same(mono2, mono1, mean_tol=0.01, max_tol=0.1)


@pytest.mark.parametrize("windowed", [False, True])
def test_generated_monochrome1_equals_its_monochrome2_inversion(windowed: bool) -> None:
    mono2 = _chest_like(make_dx())
    if windowed:
        mono2.WindowCenter, mono2.WindowWidth = 1800, 2400
    mono1 = copy.deepcopy(mono2)
    mono1.PhotometricInterpretation = "MONOCHROME1"
    inverted = 4095 - np.frombuffer(mono2.PixelData, dtype=np.uint16)
    mono1.PixelData = inverted.astype(np.uint16).tobytes()
    if windowed:
        # Mirror the window: LINEAR maps c - 0.5 to the middle, so the mirror of c is 4094 - c.
        mono1.WindowCenter, mono1.WindowWidth = 4094 - 1800, 2400
    _same(preprocess(mono2, SPEC), preprocess(mono1, SPEC), mean_tol=1e-3, max_tol=0.02)


def test_rescaled_copy_with_compensated_pixels_gives_the_same_input() -> None:
    original = _chest_like(make_dx(), bits=12)
    original.RescaleSlope, original.RescaleIntercept = 1, 0
    original.WindowCenter, original.WindowWidth = 1500, 3000
    rescaled = copy.deepcopy(original)
    stored = np.frombuffer(original.PixelData, dtype=np.uint16).astype(np.int64)
    # m = stored * 1 + 0 == stored' * 0.5 + 10  =>  stored' = (stored - 10) * 2
    rescaled.RescaleSlope, rescaled.RescaleIntercept = 0.5, 10
    rescaled.BitsStored, rescaled.HighBit, rescaled.PixelRepresentation = 16, 15, 1
    rescaled.PixelData = ((stored - 10) * 2).astype(np.int16).tobytes()
    _same(preprocess(original, SPEC), preprocess(rescaled, SPEC))
    del original.WindowCenter, original.WindowWidth, rescaled.WindowCenter, rescaled.WindowWidth
    _same(preprocess(original, SPEC), preprocess(rescaled, SPEC))


def _dcmtk(tool: str, args: list[str], src: Path, dst: Path) -> Path:
    if not Path(tool).exists():
        pytest.skip(f"{tool} not installed (apt-get install dcmtk)")
    subprocess.run([tool, *args, str(src), str(dst)], check=True, capture_output=True)
    return dst


def test_generated_compressed_copies_give_the_same_input(tmp_path: Path) -> None:
    ds = _chest_like(make_dx(), bits=12)
    original = tmp_path / "original.dcm"
    ds.save_as(original, enforce_file_format=True)
    j2k = pydicom.dcmread(original)
    j2k.compress(JPEG2000Lossless)
    j2k.save_as(tmp_path / "j2k.dcm", enforce_file_format=True)
    copies = {
        "jpeg-lossless": _dcmtk("/usr/bin/dcmcjpeg", ["+e1"], original, tmp_path / "jpegll.dcm"),
        "jpeg-ls": _dcmtk("/usr/bin/dcmcjpls", ["+el"], original, tmp_path / "jpegls.dcm"),
        "rle": _dcmtk("/usr/bin/dcmcrle", [], original, tmp_path / "rle.dcm"),
        "j2k": tmp_path / "j2k.dcm",
    }
    reference = preprocess(original, SPEC)
    for name, path in copies.items():
        syntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
        assert syntax.is_compressed, name
        _same(reference, preprocess(path, SPEC))


def _regions(image: np.ndarray) -> tuple[float, float]:
    """Mean brightness of the spine/mediastinum strip and of the two lung fields."""
    h, w = image.shape
    rows = slice(int(0.30 * h), int(0.65 * h))
    centre = image[rows, int(0.45 * w):int(0.55 * w)].mean()
    lungs = (image[rows, int(0.18 * w):int(0.33 * w)].mean()
             + image[rows, int(0.67 * w):int(0.82 * w)].mean()) / 2
    return float(centre), float(lungs)


@pytest.mark.parametrize("name", [FUJI, ORTHANC, SIIM, NIH])
def test_real_chest_files_display_with_bright_bones_and_dark_lungs(shared_dicom: Path, name: str) -> None:
    centre, lungs = _regions(load_display(shared_dicom / name, SPEC).image)
    assert centre > lungs + 0.05


def test_fake_monochrome1_header_is_followed_and_comes_out_inverted(shared_dicom: Path) -> None:
    """The documented fault: MONOCHROME1 over uninverted pixels. We follow the header (as
    DICOM requires), so the image comes out as a negative; the header is the sender's bug."""
    centre, lungs = _regions(load_display(shared_dicom / FAKE_MONO1, SPEC).image)
    assert centre < lungs - 0.05


def _rgb() -> Dataset:
    ds = make_dx()
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelData = np.zeros((64, 64, 3), dtype=np.uint8).tobytes()
    return ds


def _photometric(value: str) -> Dataset:
    ds = make_dx()
    ds.PhotometricInterpretation = value
    return ds


def _without_pixels() -> Dataset:
    ds = make_dx()
    del ds.PixelData
    return ds


def _huge() -> Dataset:
    ds = make_dx()
    ds.Rows = 9000
    return ds


def _truncated() -> Dataset:
    ds = make_dx()
    ds.PixelData = ds.PixelData[:100]
    return ds


def _blank() -> Dataset:
    ds = make_dx()
    ds.PixelData = np.full((64, 64), 1000, dtype=np.uint16).tobytes()
    return ds


def _no_decoder() -> Dataset:
    ds = make_dx()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.110"  # JPEG XL lossless: no decoder here
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\x0a" + b"\x00" * 64])
    return ds


def _corrupt(syntax: str, start: bytes) -> Callable[[], Dataset]:
    """Damaged compressed data of a syntax that has a decoder here."""
    def make() -> Dataset:
        ds = make_dx()
        ds.file_meta.TransferSyntaxUID = syntax
        ds.PixelData = pydicom.encaps.encapsulate([start + bytes(range(256)) * 4])
        return ds
    return make


@pytest.mark.parametrize(("make", "reason"), [
    (_without_pixels, Refusal.NO_PIXEL_DATA),
    (_huge, Refusal.TOO_LARGE),
    (_rgb, Refusal.NOT_GRAYSCALE),
    (lambda: _photometric("HSV"), Refusal.UNSUPPORTED_PHOTOMETRIC),
    (_truncated, Refusal.CORRUPT_PIXEL_DATA),
    (_blank, Refusal.BLANK_IMAGE),
    (_no_decoder, Refusal.UNSUPPORTED_TRANSFER_SYNTAX),
    (_corrupt("1.2.840.10008.1.2.4.90", b"\xff\x4f\xff\x51"), Refusal.CORRUPT_PIXEL_DATA),
    (_corrupt("1.2.840.10008.1.2.4.91", b"\x00\x00\x00\x0cjP  "), Refusal.CORRUPT_PIXEL_DATA),
    (_corrupt("1.2.840.10008.1.2.4.80", b"\xff\xd8\xff\xf7"), Refusal.CORRUPT_PIXEL_DATA),
    (_corrupt("1.2.840.10008.1.2.4.70", b"\xff\xd8\xff\xc3"), Refusal.CORRUPT_PIXEL_DATA),
    (_corrupt("1.2.840.10008.1.2.5", b"\x01\x00\x00\x00"), Refusal.CORRUPT_PIXEL_DATA),
])
def test_each_refusal_reason_is_raised_for_its_crafted_input(make, reason: Refusal) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PreprocessError) as info:
        preprocess(make(), SPEC)
    assert info.value.reason is reason


def test_too_large_is_refused_before_decoding() -> None:
    ds = _huge()
    ds.PixelData = b""  # decoding this would fail with corrupt_pixel_data instead
    with pytest.raises(PreprocessError) as info:
        preprocess(ds, dataclasses.replace(SPEC, max_side=8192))
    assert info.value.reason is Refusal.TOO_LARGE


def test_unreadable_files_are_refused(tmp_path: Path) -> None:
    text = tmp_path / "notes.dcm"
    text.write_text("this is not DICOM")
    png = tmp_path / "broken.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    for path in (text, png):
        with pytest.raises(PreprocessError) as info:
            preprocess(path, SPEC)
        assert info.value.reason is Refusal.NOT_READABLE


def test_header_inconsistencies_are_scored_with_a_note() -> None:
    high_bit = _chest_like(make_dx())
    high_bit.HighBit = 15 if int(high_bit.BitsStored) != 16 else 11
    assert any(n.startswith("high_bit_inconsistent") for n in preprocess(high_bit, SPEC).notes)
    longer = _chest_like(make_dx())
    longer.PixelData = longer.PixelData + b"\x00\x01" * 500
    assert any(n.startswith("pixel_data_longer_than_expected")
               for n in preprocess(longer, SPEC).notes)
    assert preprocess(_chest_like(make_dx()), SPEC).notes == ()


def test_multiframe_scores_the_first_frame_and_says_so() -> None:
    ds = _chest_like(make_dx())
    first = np.frombuffer(ds.PixelData, dtype=np.uint16).reshape(256, 200)
    ds.NumberOfFrames = 3
    ds.PixelData = np.concatenate([first, 4095 - first, first // 2]).tobytes()
    single = _chest_like(make_dx())
    result = preprocess(ds, SPEC)
    assert result.notes == ("multiframe: scored frame 1 of 3",)
    _same(result, preprocess(single, SPEC))


def test_png_input_and_model_input_range(tmp_path: Path) -> None:
    gray = (np.linspace(0, 255, 300 * 200).reshape(300, 200)).astype(np.uint8)
    Image.fromarray(gray).save(tmp_path / "g.png")
    Image.fromarray(np.stack([gray] * 3, axis=2)).save(tmp_path / "rgb.png")
    a, b = preprocess(tmp_path / "g.png", SPEC), preprocess(tmp_path / "rgb.png", SPEC)
    _same(a, b)
    assert a.array.shape == (128, 128, 3) and a.array.dtype == np.float32
    assert -1.0 <= a.array.min() < -0.9 and 0.9 < a.array.max() <= 1.0


def test_pad_aspect_keeps_proportions_and_pads_black() -> None:
    result = preprocess(_chest_like(make_dx()), dataclasses.replace(SPEC, aspect="pad"))
    # 256 x 200 scaled to 128 high -> 100 wide, centred: 14 black columns each side.
    assert np.all(result.equalized[:, :14] == 0) and np.all(result.equalized[:, -14:] == 0)
    assert result.equalized[:, 14:114].mean() > 0.3


def test_real_files_match_their_golden_fingerprints() -> None:
    if not DICOM_DIR.is_dir():
        pytest.skip(f"real DICOM files not available at {DICOM_DIR}")
    golden = json.loads(GOLDEN_FILE.read_text())
    assert len(golden) >= 10
    for name, expected in golden.items():
        actual = fingerprint(preprocess(SHARED_DATA / "dicom" / name, SPEC))
        assert actual["mean"] == pytest.approx(expected["mean"], abs=2e-3), name
        assert actual["std"] == pytest.approx(expected["std"], abs=2e-3), name
        assert actual["voi"] == expected["voi"], name
        mismatched = sum(x != y for x, y in zip(actual["grid"], expected["grid"], strict=True))
        assert mismatched <= 2, f"{name}: {mismatched} of 64 grid cells changed"

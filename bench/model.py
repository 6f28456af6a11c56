"""Model benchmark: preprocessing and prediction rates, and file-to-probability end to end.

    python -m bench.model [--bundle DIR] [--images 24] [--workdir bench/out/model]

Prints, on this machine:
- decode time per image of the first frame of a 2500x2048 16-bit DX, per
  transfer syntax and per library (pydicom's plugins, imagecodecs, Pillow's
  OpenJPEG at the reduce level the input size allows), and what the pipeline
  uses (model.fast_decode);
- preprocessing images/s for 2500x2048 16-bit DX (uncompressed, JPEG 2000
  lossless, JPEG lossless, JPEG-LS lossless) and 512x512, beside the naive
  chain (equalize_hist at full size, then skimage resize) as the reference;
- predict images/s at batch 1, 8 and 32 on ready tensors (the bare network);
- end to end (files -> decode -> preprocess in a thread pool -> batches of 8
  -> probabilities) as a ratio of the bare network at batch 8.
Without --bundle an untrained demo bundle at 299 px is created in the workdir
(speed does not depend on the weights). OpenJPEG's threads for the reduced
JPEG 2000 decode come from OPJ_NUM_THREADS in the environment (one without it).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import imagecodecs
import jpeg_ls
import numpy as np
import pydicom
from PIL import Image, Jpeg2KImagePlugin
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder
from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1, JPEGLSLossless
from skimage.exposure import equalize_hist
from skimage.transform import resize

from model import fast_decode
from model.preprocess import PreprocessSpec, preprocess, read_dicom
from tests.factories import make_dx

BIG = "2500x2048 uncompressed"
J2K = "2500x2048 JPEG 2000 lossless"
JPEG_LL = "2500x2048 JPEG lossless"
JPEG_LS = "2500x2048 JPEG-LS lossless"
SMALL = "512x512 uncompressed"


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _radiograph(rows: int, cols: int, seed: int) -> pydicom.Dataset:
    """A 16-bit image with smooth anatomy-like structure (compresses like a real one)."""
    ds = make_dx(rows, cols, seed=seed)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    body = np.sin(xx / (cols / 9)) * np.cos(yy / (rows / 7)) + 1.5
    pixels = body / 2.5 * 50000 + rng.normal(0, 300, (rows, cols))
    ds.PixelData = np.clip(pixels, 0, 65535).astype(np.uint16).tobytes()
    return ds


def _jpeg_lossless(ds: pydicom.Dataset) -> None:
    """Encode ``ds`` in place as JPEG lossless, first-order prediction (1.2.840.10008.1.2.4.70).

    pydicom has no JPEG lossless encoder; libjpeg-turbo's (through imagecodecs) writes the
    same SOF3 codestream DCMTK's dcmcjpeg +e1 does."""
    pixels = ds.pixel_array
    frame = imagecodecs.jpeg8_encode(pixels, lossless=True, predictor=1,
                                     bitspersample=int(ds.BitsStored))
    ds.PixelData = encapsulate([bytes(frame)])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1


def make_inputs(workdir: Path, count: int) -> dict[str, list[Path]]:
    sets: dict[str, list[Path]] = {}
    encoders: dict[str, Callable[[pydicom.Dataset], None] | None] = {
        BIG: None, J2K: lambda ds: ds.compress(JPEG2000Lossless), JPEG_LL: _jpeg_lossless,
        JPEG_LS: lambda ds: ds.compress(JPEGLSLossless), SMALL: None}
    for label, encode in encoders.items():
        rows, cols = (512, 512) if label == SMALL else (2500, 2048)
        folder = workdir / label.replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for i in range(count):
            path = folder / f"{i:03d}.dcm"
            if not path.exists():
                ds = _radiograph(rows, cols, i)
                if encode is not None:
                    encode(ds)
                ds.save_as(path, enforce_file_format=True)
            paths.append(path)
        sets[label] = paths
        _progress(f"inputs ready: {label} x {count}")
    return sets


def _pillow_reduced(frame: bytes, reduce: int) -> np.ndarray:
    """Pillow's OpenJPEG decode alone, at ``reduce`` (without model.fast_decode's checks)."""
    with Image.open(io.BytesIO(frame), formats=["JPEG2000"]) as im:
        assert isinstance(im, Jpeg2KImagePlugin.Jpeg2KImageFile)
        im.reduce = reduce
        im.load()
        return np.asarray(im)


def _opj_threads(threads: int, decode: Callable[[], object]) -> object:
    """``decode()`` with OpenJPEG (under Pillow) on ``threads`` threads (OPJ_NUM_THREADS)."""
    before = os.environ.get(fast_decode.OPJ_THREADS)
    os.environ[fast_decode.OPJ_THREADS] = str(threads)
    try:
        return decode()
    finally:
        if before is None:
            del os.environ[fast_decode.OPJ_THREADS]
        else:
            os.environ[fast_decode.OPJ_THREADS] = before


def _decoders(label: str, datasets: Sequence[pydicom.Dataset], frames: list[bytes], size: int
              ) -> dict[str, Callable[[int], object]]:
    """The libraries timed for one syntax: each decodes image ``i``'s first frame."""
    decoder = get_decoder(datasets[0].file_meta.TransferSyntaxUID)
    threads = fast_decode.default_threads()
    reduce = fast_decode.reduce_level(int(datasets[0].Rows), int(datasets[0].Columns), size, levels=5)
    libraries: dict[str, Callable[[int], object]] = {
        "pydicom": lambda i: decoder.as_array(datasets[i], index=0)}
    if label == J2K:
        libraries |= {
            "imagecodecs 1 thread": lambda i: imagecodecs.jpeg2k_decode(frames[i], numthreads=1),
            f"imagecodecs {threads} threads":
                lambda i: imagecodecs.jpeg2k_decode(frames[i], numthreads=threads),
            f"Pillow reduce {reduce}, 1 thread":
                lambda i: _opj_threads(1, lambda: _pillow_reduced(frames[i], reduce)),
            f"Pillow reduce {reduce}, {threads} threads":
                lambda i: _opj_threads(threads, lambda: _pillow_reduced(frames[i], reduce))}
    elif label == JPEG_LL:
        libraries |= {"imagecodecs jpeg8 (libjpeg-turbo)": lambda i: imagecodecs.jpeg8_decode(frames[i]),
                      "imagecodecs ljpeg (liblj92)": lambda i: imagecodecs.ljpeg_decode(frames[i])}
    elif label == JPEG_LS:
        libraries |= {"pyjpegls": lambda i: jpeg_ls.decode(np.frombuffer(frames[i], np.uint8)),
                      "imagecodecs jpegls (CharLS)": lambda i: imagecodecs.jpegls_decode(frames[i])}
    if label != BIG:
        libraries["ours (model.fast_decode)"] = lambda i: fast_decode.fast_first_frame(datasets[i], size)
    return libraries


def decode_timings(sets: dict[str, list[Path]], size: int, count: int) -> dict[str, dict[str, float]]:
    """ms per image to decode the first frame, per syntax and library, from a data set in memory."""
    timings: dict[str, dict[str, float]] = {}
    for label in (BIG, J2K, JPEG_LL, JPEG_LS):
        datasets = [pydicom.dcmread(p) for p in sets[label][:count]]
        frames = ([b""] * len(datasets) if label == BIG
                  else [fast_decode.first_frame_bytes(ds) for ds in datasets])
        timings[label] = {}
        for name, fn in _decoders(label, datasets, frames, size).items():
            fn(0)
            started = time.perf_counter()
            for i in range(len(datasets)):
                fn(i)
            timings[label][name] = 1000 * (time.perf_counter() - started) / len(datasets)
    return timings


def _rate(fn: Callable[[Path], object], paths: list[Path]) -> float:
    started = time.perf_counter()
    for p in paths:
        fn(p)
    return len(paths) / (time.perf_counter() - started)


def naive_chain(path: Path, size: int) -> np.ndarray:
    """The chain measured before this pipeline: equalize at full size, then resize."""
    image = read_dicom(path).pixel_array.astype(np.float32)
    return resize(equalize_hist(image), (size, size), anti_aliasing=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path)
    p.add_argument("--images", type=int, default=24)
    p.add_argument("--workdir", type=Path, default=Path("bench/out/model"))
    p.add_argument("--threads", type=int, default=2, help="preprocessing threads end to end")
    args = p.parse_args(argv)
    workdir = args.workdir.resolve()
    bundle = args.bundle
    if bundle is None:
        bundle = workdir / "demo-bundle-299"
        if not (bundle / "manifest.json").exists():
            from model.bundle import init_demo_bundle

            _progress("creating an untrained 299 px demo bundle ...")
            init_demo_bundle(bundle, 299)
    from model.predictor import Predictor

    predictor = Predictor(bundle, warm_up_batch=8)
    spec: PreprocessSpec = predictor.manifest.preprocessing
    size = spec.input_size
    sets = make_inputs(workdir / "inputs", args.images)
    print(f"\nmodel benchmark: {os.cpu_count()} CPUs, {platform.platform()}, device {predictor.device}, "
          f"input {size} px, {args.images} images per set, OPJ_NUM_THREADS "
          f"{os.environ.get('OPJ_NUM_THREADS', '(unset)')}")

    decode_count = min(args.images, 6)
    _progress("decode timings ...")
    decode_ms = decode_timings(sets, size, decode_count)
    print(f"\ndecode, first frame of a 2500x2048 16-bit image, ms per image ({decode_count} images, "
          f"from bytes in memory):")
    for label, libraries in decode_ms.items():
        for name, ms in libraries.items():
            print(f"  {label:<30} {name:<36} {ms:7.1f} ms")

    print("\npreprocessing (file -> model input), images/s:")
    pre_rates = {}
    for label, paths in sets.items():
        _progress(f"preprocess {label} ...")
        ours = _rate(lambda path: preprocess(path, spec), paths)
        naive = _rate(lambda path: naive_chain(path, size), paths[: max(4, len(paths) // 4)])
        pre_rates[label] = ours
        print(f"  {label:<30} ours {ours:7.1f}/s ({1000 / ours:6.1f} ms)   "
              f"naive equalize-then-resize {naive:6.1f}/s ({1000 / naive:6.1f} ms)   x{ours / naive:.1f}")

    print(f"\npredict on ready tensors ({size} px), images/s:")
    rng = np.random.default_rng(0)
    net_rates = {}
    for batch_size in (1, 8, 32):
        batch = rng.uniform(-1, 1, (batch_size, size, size, 3)).astype(np.float32)
        predictor.predict(batch)
        rounds = max(2, 48 // batch_size)
        started = time.perf_counter()
        for _ in range(rounds):
            predictor.predict(batch)
        net_rates[batch_size] = rounds * batch_size / (time.perf_counter() - started)
        print(f"  batch {batch_size:>2}: {net_rates[batch_size]:6.1f}/s "
              f"({1000 / net_rates[batch_size]:6.1f} ms per image)")
    per_image_net = 1000 / net_rates[8]
    big = 1000 / pre_rates[BIG]
    print(f"\n  2500x2048 preprocessing {big:.1f} ms vs network {per_image_net:.1f} ms per image "
          f"(batch 8): {'below' if big < per_image_net else 'ABOVE'} the network's cost")

    print("\nend to end (files -> probabilities, batch 8, "
          f"{args.threads} preprocessing threads overlapping inference):")
    end_to_end = {}
    for label, paths in sets.items():
        _progress(f"end to end {label} ...")
        started = time.perf_counter()
        with ThreadPoolExecutor(args.threads) as pool:
            pending = pool.map(lambda path: preprocess(path, spec).array, paths)
            ready: list[np.ndarray] = []
            for array in pending:
                ready.append(array)
                if len(ready) == 8:
                    predictor.predict(np.stack(ready))
                    ready = []
            if ready:
                predictor.predict(np.stack(ready))
        rate = len(paths) / (time.perf_counter() - started)
        end_to_end[label] = rate
        print(f"  {label:<30} {rate:6.1f}/s   bare network {net_rates[8]:6.1f}/s   "
              f"ratio {rate / net_rates[8]:.2f}")
    print(json.dumps({"bench": "model", "device": predictor.device, "input_size": size,
                      "images": args.images,
                      "network_images_per_s": {str(b): round(r, 2) for b, r in net_rates.items()},
                      "decode_ms": {k: {name: round(ms, 1) for name, ms in v.items()}
                                    for k, v in decode_ms.items()},
                      "preprocess_ms": {k: round(1000 / r, 1) for k, r in pre_rates.items()},
                      "end_to_end_vs_bare": {k: round(r / net_rates[8], 3)
                                             for k, r in end_to_end.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

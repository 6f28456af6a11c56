"""`opacityd model ...`: inspect a bundle, score files, preview the pipeline, make a demo bundle.

Keras is imported only by the subcommands that need it, so `model info`
answers without loading TensorFlow.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from daemon.output import emit
from model.errors import BundleError, PreprocessError
from model.manifest import read_manifest, sha256_file
from model.preprocess import PreprocessSpec, load_display, to_model_input

EXIT_OK, EXIT_ERROR = 0, 1


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    model = sub.add_parser("model", help="model bundles: info, predict, preview, init-demo")
    msub = model.add_subparsers(dest="model_command", required=True, metavar="MODEL_COMMAND")
    info = msub.add_parser("info", help="print a bundle's manifest and checksum status")
    info.add_argument("bundle", type=Path)
    predict = msub.add_parser("predict", help="probability (or refusal reason) per DICOM/PNG/JPG file")
    predict.add_argument("bundle", type=Path)
    predict.add_argument("files", type=Path, nargs="+")
    predict.add_argument("--json", action="store_true")
    preview = msub.add_parser("preview", help="write the image as the network sees it, beside the original")
    preview.add_argument("file", type=Path)
    preview.add_argument("-o", "--output", type=Path, required=True)
    preview.add_argument("--bundle", type=Path, help="use this bundle's preprocessing (default: 299 px)")
    demo = msub.add_parser("init-demo", help="write an UNTRAINED demo bundle (not for clinical use)")
    demo.add_argument("directory", type=Path)
    demo.add_argument("--input-size", type=int, default=299)
    demo.add_argument("--exist-ok", action="store_true", help="keep a valid bundle already there")


def run(args: argparse.Namespace) -> int:
    try:
        if args.model_command == "info":
            return _info(args.bundle)
        if args.model_command == "predict":
            return _predict(args.bundle, args.files, args.json)
        if args.model_command == "preview":
            return _preview(args.file, args.output, args.bundle)
        return _init_demo(args.directory, args.input_size, args.exist_ok)
    except BundleError as e:
        emit(f"opacityd: model bundle error: {e}", error=True)
        return EXIT_ERROR


def _info(bundle: Path) -> int:
    manifest = read_manifest(bundle, verify_checksum=False)
    actual = sha256_file(bundle / "model.keras")
    ok = actual == manifest.weights_sha256
    emit(f"model:        {manifest.label}")
    emit(f"input size:   {manifest.input_size} x {manifest.input_size} x 3 "
          f"({manifest.preprocessing.aspect}, {manifest.preprocessing.pipeline})")
    emit(f"classes:      {', '.join(manifest.class_names)} (positive: {manifest.positive_class})")
    emit(f"thresholds:   {json.dumps(manifest.to_json()['thresholds'])}")
    emit(f"created:      {manifest.created} with Keras {manifest.keras_version} "
          f"({manifest.backend})")
    emit(f"validated:    {manifest.validated}")
    emit(f"checksum:     {'OK' if ok else 'MISMATCH'} sha256 {actual}")
    emit("manifest:")
    emit(json.dumps(manifest.to_json(), indent=2, sort_keys=True))
    return EXIT_OK if ok else EXIT_ERROR


def _predict(bundle: Path, files: list[Path], as_json: bool) -> int:
    from model.predictor import Predictor
    from model.preprocess import preprocess

    predictor = Predictor(bundle)
    manifest = predictor.manifest
    rows: list[dict[str, Any]] = []
    for path in files:
        try:
            pre = preprocess(path, manifest.preprocessing)
        except PreprocessError as e:
            rows.append({"file": str(path), "refused": e.reason.value, "detail": e.detail})
            continue
        probability = float(predictor.predict(pre.array[None])[0])
        rows.append({"file": str(path), "probability": round(probability, 4),
                     "opacity": probability >= manifest.thresholds.decision,
                     "notes": list(pre.notes)})
    if as_json:
        emit(json.dumps({"model": manifest.label, "results": rows}, indent=2))
        return EXIT_OK
    emit(f"model: {manifest.label}; decision threshold {manifest.thresholds.decision}")
    for row in rows:
        if "refused" in row:
            emit(f"{row['file']}: refused ({row['refused']}: {row['detail']})")
        else:
            verdict = "opacity" if row["opacity"] else "none"
            emit(f"{row['file']}: p(opacity) = {row['probability']:.4f} -> {verdict}")
    return EXIT_OK


def _preview(file: Path, output: Path, bundle: Path | None) -> int:
    spec = read_manifest(bundle).preprocessing if bundle else PreprocessSpec()
    try:
        display = load_display(file, spec)
        pre = to_model_input(display, spec)
    except PreprocessError as e:
        emit(f"{file}: refused ({e.reason.value}: {e.detail})")
        return EXIT_ERROR
    height = 512
    original = display.image
    width = max(1, round(original.shape[1] * height / original.shape[0]))
    left = Image.fromarray((original * 255).astype(np.uint8)).resize(
        (width, height), Image.Resampling.BILINEAR)
    right = Image.fromarray((pre.equalized * 255).astype(np.uint8)).resize(
        (height, height), Image.Resampling.NEAREST)
    canvas = Image.new("L", (width + height + 10, height + 24), color=0)
    canvas.paste(left, (0, 24))
    canvas.paste(right, (width + 10, 24))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), f"original ({display.voi} VOI)", fill=255)
    draw.text((width + 14, 4), f"network input {spec.input_size}px, equalize_hist", fill=255)
    output.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(output)
    emit(f"wrote {output}" + (f" ({'; '.join(pre.notes)})" if pre.notes else ""))
    return EXIT_OK


def _init_demo(directory: Path, input_size: int, exist_ok: bool) -> int:
    if exist_ok and (directory / "manifest.json").exists():
        manifest = read_manifest(directory)
        emit(f"kept existing bundle {directory}: {manifest.label}")
        return EXIT_OK
    from model.bundle import init_demo_bundle

    manifest = init_demo_bundle(directory, input_size)
    emit(f"wrote {directory}: {manifest.label}, input {input_size} px.\n"
          "This network is UNTRAINED: its scores are meaningless. Use it only to try the daemon.")
    return EXIT_OK

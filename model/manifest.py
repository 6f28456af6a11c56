"""The bundle manifest: schema, validation, and the weights checksum. No Keras import here,
so the receiver can check a bundle without loading TensorFlow."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from model.durable import write_text_durably
from model.errors import BundleError
from model.preprocess import PreprocessSpec

MANIFEST = "manifest.json"
WEIGHTS = "model.keras"
SCHEMA_VERSION = 1
NOT_FOR_CLINICAL_USE = "NOT FOR CLINICAL USE"


@dataclass(frozen=True)
class Thresholds:
    decision: float = 0.5
    """Probability at or above which the study is reported as "opacity present"."""
    urgent: float = 0.9
    elevated: float = 0.5

    def check(self) -> None:
        for name, value in asdict(self).items():
            if not 0.0 <= value <= 1.0:
                raise BundleError(f"manifest thresholds.{name} = {value!r}: expected 0..1")
        if self.elevated > self.urgent:
            raise BundleError(f"thresholds: elevated threshold {self.elevated} exceeds urgent threshold "
                              f"{self.urgent}")


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    created: str
    keras_version: str
    backend: str
    preprocessing: PreprocessSpec
    class_names: tuple[str, ...]
    positive_class: str
    thresholds: Thresholds
    weights_sha256: str
    validated: bool = False
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    @property
    def input_size(self) -> int:
        return self.preprocessing.input_size

    @property
    def positive_index(self) -> int:
        return self.class_names.index(self.positive_class)

    @property
    def label(self) -> str:
        """How every output names the model; unvalidated bundles say so."""
        suffix = "" if self.validated else f" ({NOT_FOR_CLINICAL_USE})"
        return f"{self.name} {self.version}{suffix}"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["preprocessing"] = self.preprocessing.to_json()
        data["class_names"] = list(self.class_names)
        return data


_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "schema_version": int, "name": str, "version": str, "created": str, "keras_version": str,
    "backend": str, "preprocessing": dict, "class_names": list, "positive_class": str,
    "thresholds": dict, "weights_sha256": str, "validated": bool,
}


def parse_manifest(data: Any) -> Manifest:
    """Validate a manifest's JSON; :class:`BundleError` names the first problem."""
    if not isinstance(data, dict):
        raise BundleError("manifest.json must hold a JSON object")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise BundleError(f"manifest.json is missing keys: {', '.join(missing)}")
    for key, kind in _REQUIRED.items():
        if not isinstance(data[key], kind) or (kind is int and isinstance(data[key], bool)):
            raise BundleError(f"manifest {key} = {data[key]!r}: expected {getattr(kind, '__name__', kind)}")
    if data["schema_version"] != SCHEMA_VERSION:
        raise BundleError(f"manifest schema_version {data['schema_version']} is not {SCHEMA_VERSION}")
    classes = tuple(data["class_names"])
    if len(classes) < 2 or not all(isinstance(c, str) for c in classes):
        raise BundleError(f"manifest class_names = {list(classes)!r}: expected at least two names")
    if data["positive_class"] not in classes:
        raise BundleError(f"manifest positive_class {data['positive_class']!r} is not in class_names")
    try:
        spec = PreprocessSpec.from_json(data["preprocessing"])
        thresholds = Thresholds(**data["thresholds"])
    except (TypeError, ValueError) as e:
        raise BundleError(f"manifest preprocessing/thresholds invalid: {e}") from e
    thresholds.check()
    extra = {k: data[k] for k in ("training", "metrics") if isinstance(data.get(k), dict)}
    return Manifest(
        name=data["name"], version=data["version"], created=data["created"],
        keras_version=data["keras_version"], backend=data["backend"], preprocessing=spec,
        class_names=classes, positive_class=data["positive_class"], thresholds=thresholds,
        weights_sha256=data["weights_sha256"], validated=data["validated"],
        schema_version=data["schema_version"], **extra,
    )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(bundle: Path, verify_checksum: bool = True) -> Manifest:
    """Read and validate ``bundle/manifest.json`` (and the weights' sha256)."""
    if not bundle.is_dir():
        raise BundleError(f"model bundle {bundle} is not a directory")
    path = bundle / MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise BundleError(f"model bundle {bundle} has no {MANIFEST}") from e
    except json.JSONDecodeError as e:
        raise BundleError(f"{path} is not valid JSON: {e}") from e
    manifest = parse_manifest(data)
    weights = bundle / WEIGHTS
    if not weights.is_file():
        raise BundleError(f"model bundle {bundle} has no {WEIGHTS}")
    if verify_checksum:
        actual = sha256_file(weights)
        if actual != manifest.weights_sha256:
            raise BundleError(f"{weights} checksum mismatch: manifest says "
                              f"{manifest.weights_sha256[:16]}..., file is {actual[:16]}...")
    return manifest


def write_manifest(bundle: Path, manifest: Manifest) -> None:
    write_text_durably(bundle / MANIFEST, json.dumps(manifest.to_json(), indent=2, sort_keys=True) + "\n")

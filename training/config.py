"""The training configuration: one TOML file, validated once against the documented defaults.

``default.toml`` beside this module is both the documentation and the defaults; a user file
overrides any subset of it. Unknown keys and wrong types are errors that name the key.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULTS_FILE = Path(__file__).with_name("default.toml")


class ConfigError(ValueError):
    """A training config problem, naming the key."""


@dataclass(frozen=True)
class DataConfig:
    siim: str
    radiography: str
    labelled_csv: str
    labelled_images: str
    siim_metadata: str
    max_missing_fraction: float
    near_duplicate_distance: int
    near_duplicate_correlation: float


@dataclass(frozen=True)
class SplitConfig:
    strategy: str
    seed: int
    test_sources: tuple[str, ...]
    test_fraction: float
    valid_fraction: float
    test_fold: int
    valid_fold: int


@dataclass(frozen=True)
class ModelConfig:
    input_size: int
    aspect: str
    weights: str


@dataclass(frozen=True)
class AugmentConfig:
    horizontal_flip: bool
    zoom: float
    shear_degrees: float
    brightness: tuple[float, float]


@dataclass(frozen=True)
class TrainConfig:
    seed: int
    batch_size: int
    class_weights: bool
    early_stopping_patience: int
    steps_per_epoch: int
    batchnorm_momentum: float
    loader_workers: int
    prefetch_batches: int
    precision: str


@dataclass(frozen=True)
class PhaseConfig:
    epochs: int
    learning_rate: float
    train_base: bool
    sources: tuple[str, ...]


@dataclass(frozen=True)
class EvaluateConfig:
    bootstrap: int
    target_sensitivities: tuple[float, ...]
    decision_sensitivity: float
    error_examples: int
    error_grid_sources: tuple[str, ...]


@dataclass(frozen=True)
class Config:
    data: DataConfig
    split: SplitConfig
    model: ModelConfig
    augment: AugmentConfig
    train: TrainConfig
    phase1: PhaseConfig
    phase2: PhaseConfig
    evaluate: EvaluateConfig
    text: str
    """The merged configuration as TOML, as it is copied into a run folder."""


_SECTIONS: dict[str, type] = {
    "data": DataConfig, "split": SplitConfig, "model": ModelConfig, "augment": AugmentConfig,
    "train": TrainConfig, "phase1": PhaseConfig, "phase2": PhaseConfig, "evaluate": EvaluateConfig,
}


def _merge(defaults: dict[str, Any], user: dict[str, Any]) -> dict[str, Any]:
    merged = {section: dict(values) for section, values in defaults.items()}
    for section, values in user.items():
        if section not in defaults:
            raise ConfigError(f"unknown section [{section}]; expected one of {', '.join(defaults)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{section} must be a table")
        for key, value in values.items():
            if key not in defaults[section]:
                raise ConfigError(f"unknown key {section}.{key}; expected one of "
                                  f"{', '.join(defaults[section])}")
            default = defaults[section][key]
            if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if type(value) is not type(default):
                raise ConfigError(f"{section}.{key} = {value!r}: expected {type(default).__name__}")
            merged[section][key] = value
    return merged


def _to_toml(data: dict[str, Any]) -> str:
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    lines: list[str] = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {value(v)}" for key, v in values.items()]
        lines.append("")
    return "\n".join(lines)


def _check(config: Config) -> None:
    def require(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    require(71 <= config.model.input_size <= 1024, "model.input_size must be within 71..1024")
    require(config.split.strategy in ("grouped", "thesis"),
            f"split.strategy = {config.split.strategy!r}: expected 'grouped' or 'thesis'")
    require(config.data.near_duplicate_distance <= 64,
            "data.near_duplicate_distance must be at most 64 (bits of the hash); -1 turns it off")
    require(0.0 < config.data.near_duplicate_correlation <= 1.0,
            "data.near_duplicate_correlation must be within 0..1")
    require(config.model.aspect in ("stretch", "pad"), "model.aspect must be 'stretch' or 'pad'")
    for name in ("test_fraction", "valid_fraction"):
        require(0.0 < getattr(config.split, name) < 1.0, f"split.{name} must be between 0 and 1")
    low, high = config.augment.brightness
    require(0.0 < low <= high, "augment.brightness must be [low, high] with 0 < low <= high")
    require(0.0 <= config.augment.zoom < 1.0, "augment.zoom must be within 0..1")
    require(config.train.batch_size >= 1, "train.batch_size must be at least 1")
    require(config.train.loader_workers >= 1, "train.loader_workers must be at least 1")
    require(config.train.prefetch_batches >= 1, "train.prefetch_batches must be at least 1")
    require(config.train.precision in ("auto", "float32", "mixed_float16", "mixed_bfloat16"),
            "train.precision must be 'auto', 'float32', 'mixed_float16' or 'mixed_bfloat16'")
    require(0.0 < config.train.batchnorm_momentum < 1.0, "train.batchnorm_momentum must be within 0..1")
    require(config.phase1.epochs >= 1, "phase1.epochs must be at least 1")
    require(config.model.weights.lower() != "none" or config.phase1.train_base,
            'model.weights = "none" with phase1.train_base = false would train a head on a frozen '
            "random backbone, which learns nothing; set phase1.train_base = true to train the "
            "whole network from scratch, or give ImageNet weights")
    require(config.phase2.epochs >= 0, "phase2.epochs must not be negative")
    targets = config.evaluate.target_sensitivities
    require(bool(targets) and all(0.0 < t < 1.0 for t in targets),
            "evaluate.target_sensitivities must be values between 0 and 1")
    require(config.evaluate.decision_sensitivity in targets,
            "evaluate.decision_sensitivity must be one of evaluate.target_sensitivities")
    require(bool(config.data.siim or config.data.radiography or config.data.labelled_csv),
            "no data: set data.siim, data.radiography or data.labelled_csv")


def load_config(path: Path | None, overrides: dict[str, dict[str, Any]] | None = None) -> Config:
    """Defaults, then ``path`` (if any), then ``overrides``; validated."""
    defaults = tomllib.loads(DEFAULTS_FILE.read_text())
    user: dict[str, Any] = {}
    if path is not None:
        try:
            user = tomllib.loads(path.read_text())
        except FileNotFoundError as e:
            raise ConfigError(f"config file {path} does not exist") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path} is not valid TOML: {e}") from e
    merged = _merge(_merge(defaults, user), overrides or {})
    sections: dict[str, Any] = {}
    for name, kind in _SECTIONS.items():
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in merged[name].items()}
        sections[name] = kind(**values)
    config = Config(**sections, text=_to_toml(merged))
    _check(config)
    return config

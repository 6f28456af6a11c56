"""The run folder: every file a run writes, in one place."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from training.config import Config, ConfigError, load_config


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def manifest(self) -> Path:
        return self.data / "manifest.csv"

    @property
    def summary(self) -> Path:
        return self.data / "summary.csv"

    @property
    def problems(self) -> Path:
        return self.data / "problems.csv"

    @property
    def notes(self) -> Path:
        return self.data / "notes.txt"

    @property
    def cache(self) -> Path:
        """Equalised images (n, size, size) float32, row i = manifest cache_index i."""
        return self.data / "equalized.npy"

    def phase(self, number: int) -> Path:
        return self.root / f"phase{number}"

    def checkpoint(self, number: int) -> Path:
        return self.phase(number) / "best.keras"

    def history(self, number: int) -> Path:
        return self.phase(number) / "history.csv"

    def done(self, number: int) -> Path:
        return self.phase(number) / "DONE"

    @property
    def evaluation(self) -> Path:
        return self.root / "evaluation"

    @property
    def metrics(self) -> Path:
        return self.evaluation / "metrics.json"

    @property
    def predictions(self) -> Path:
        return self.evaluation / "predictions.csv"

    @property
    def report(self) -> Path:
        return self.evaluation / "report.md"


def run_config(paths: RunPaths) -> Config:
    if not paths.config.is_file():
        raise ConfigError(f"{paths.root} is not a prepared run (no {paths.config.name}); "
                          "run `python -m training prepare` (again, if it was interrupted) first")
    return load_config(paths.config)

"""A phase's committed progress as `state.json` holds it (written by training.resume).

Keras-free, so `status` can read a run while it trains.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

STATE = "state.json"


class ResumeError(Exception):
    """A phase's saved state cannot be used; the message says what to do."""


@dataclass
class PhaseState:
    epochs_done: int = 0
    weights: str | None = None
    """The backup after the last committed epoch, relative to the phase folder."""
    best_candidate: str | None = None
    """A best model committed but perhaps not yet renamed to best.keras."""
    history: list[dict[str, float]] = field(default_factory=list)

    def best_epoch(self) -> int | None:
        """Index of the first epoch with the best val_auc (None before any epoch)."""
        scores = [row.get("val_auc", -math.inf) for row in self.history]
        return max(range(len(scores)), key=lambda i: (scores[i], -i)) if scores else None

    @property
    def best_val_auc(self) -> float | None:
        best = self.best_epoch()
        return None if best is None else self.history[best].get("val_auc")

    def epochs_without_improvement(self) -> int:
        """Epochs since the best val_auc (Keras EarlyStopping's ``wait``, min_delta 0)."""
        best = self.best_epoch()
        return 0 if best is None else len(self.history) - 1 - best

    def should_stop(self, patience: int) -> bool:
        return patience > 0 and self.epochs_without_improvement() >= patience

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1) + "\n"


def read_state(folder: Path) -> PhaseState | None:
    """The committed state in ``folder``, None when no epoch was committed yet."""
    path = folder / STATE
    if not path.is_file():
        return None
    try:
        return PhaseState(**json.loads(path.read_text()))
    except (ValueError, TypeError) as e:
        raise ResumeError(f"{path} is not a phase state ({e}); delete {folder} to restart the phase") from e

"""A phase's committed progress, so that a kill at any moment loses at most the epoch in flight.

At the end of each epoch :class:`EpochCommit` writes, each file durably (model.durable):

1. the weights and optimizer state after the epoch, ``backup/epoch-NNNN.weights.h5``;
2. when validation AUC improved, the model as ``backup/best-epoch-NNNN.keras``;
3. ``state.json`` naming both, with the history so far: this rename is the commit;
4. then the derived files: the best candidate renamed to ``best.keras``, ``history.csv``
   rewritten from the state, a line in ``fit.log``; older backups deleted.

A resumed phase (:func:`load_state`) finishes whatever step 4 a kill interrupted, deletes
files written after the last commit, restores the weights and optimizer state and starts at
the next epoch, so history.csv holds each epoch once. (Keras's BackupAndRestore writes its
weights in place and its epoch counter in a second file: a kill while it writes leaves a
torn HDF5 file that cannot be resumed.)
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Any

import keras

from model.durable import (
    remove_partial_files,
    replace_durably,
    save_model_durably,
    save_weights_durably,
    write_text_durably,
)
from training.state import STATE, PhaseState, ResumeError, read_state

BACKUP = "backup"


def _history_text(rows: list[dict[str, float]]) -> str:
    keys = ["epoch", *sorted(k for k in rows[0] if k != "epoch")]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=keys, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: int(v) if k == "epoch" else v for k, v in row.items()})
    return out.getvalue()


def _finish_commit(folder: Path, checkpoint: Path, history: Path, state: PhaseState) -> None:
    """Step 4: bring the derived files in line with ``state``; safe to repeat. Deletes every
    backup file (partial ones included) that ``state`` does not name."""
    if state.best_candidate and (folder / state.best_candidate).is_file():
        replace_durably(folder / state.best_candidate, checkpoint)
    keep = {state.weights, state.best_candidate}
    for path in (folder / BACKUP).glob("*"):
        if f"{BACKUP}/{path.name}" not in keep:
            path.unlink(missing_ok=True)
    if state.history:
        write_text_durably(history, _history_text(state.history))
    else:
        history.unlink(missing_ok=True)


def load_state(folder: Path, checkpoint: Path, history: Path) -> PhaseState:
    """The phase's last committed state (a fresh one when none), with the files it implies."""
    remove_partial_files(folder)
    state = read_state(folder) or PhaseState()
    if state.weights and not (folder / state.weights).is_file():
        raise ResumeError(f"{folder / STATE} names {state.weights}, which is missing; "
                          f"delete {folder} to restart the phase")
    _finish_commit(folder, checkpoint, history, state)
    return state


def restore(model: keras.Model, folder: Path, state: PhaseState) -> None:
    """Load the committed weights and optimizer state into the compiled ``model``."""
    if not state.weights:
        return
    model.optimizer.build(model.trainable_variables)
    try:
        model.load_weights(folder / state.weights)
    except (OSError, ValueError) as e:
        raise ResumeError(f"cannot restore {folder / state.weights} ({e}); "
                          f"delete {folder} to restart the phase") from e


class EpochCommit(keras.callbacks.Callback):  # type: ignore[misc]
    """Commits each finished epoch (module docstring); reads val_auc from the epoch logs and
    stops training after ``patience`` epochs without a better one (0: never), counting epochs
    from before a resume too."""

    def __init__(self, number: int, folder: Path, checkpoint: Path, history: Path, log_file: Path,
                 state: PhaseState, patience: int) -> None:
        super().__init__()
        self.number, self.folder, self.checkpoint = number, folder, checkpoint
        self.history, self.log_file, self.state, self.patience = history, log_file, state, patience
        self.started = time.perf_counter()

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        logs = logs if logs is not None else {}
        row = {"epoch": float(epoch), **{k: float(v) for k, v in logs.items()
                                         if isinstance(v, int | float)}}
        tag = f"{epoch + 1:04d}"
        weights = f"{BACKUP}/epoch-{tag}.weights.h5"
        save_weights_durably(self.model, self.folder / weights)
        best, candidate = self.state.best_val_auc, None
        val_auc = row.get("val_auc")
        if val_auc is not None and (best is None or val_auc > best):
            candidate = f"{BACKUP}/best-epoch-{tag}.keras"
            save_model_durably(self.model, self.folder / candidate)
        self.state = PhaseState(epochs_done=epoch + 1, weights=weights, best_candidate=candidate,
                                history=[*self.state.history, row])
        write_text_durably(self.folder / STATE, self.state.to_json())
        _finish_commit(self.folder, self.checkpoint, self.history, self.state)
        shown = " ".join(f"{k}={v:.4f}" for k, v in sorted(row.items()) if k != "epoch")
        line = (f"phase {self.number} epoch {epoch + 1}: {shown} "
                f"seconds={time.perf_counter() - self.started:.0f}{' best' if candidate else ''}")
        log_line(self.log_file, line)
        if self.state.should_stop(self.patience):
            log_line(self.log_file, f"phase {self.number}: early stop, no better val_auc in "
                                    f"{self.patience} epochs")
            self.model.stop_training = True


def log_line(log_file: Path, line: str) -> None:
    """Print ``line`` and append it, timestamped, to the run's fit.log."""
    print(line, flush=True)
    with log_file.open("a") as fh:
        fh.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line}\n")

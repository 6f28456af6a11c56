"""Crash-safe writes for model files: a temporary name in the target's folder, fsync,
rename, fsync of the folder. After a kill at any moment the target is either the old
file or the complete new one, never a torn one (Keras writes .keras and .weights.h5
files in place)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importing this module does not import Keras (the daemon's spool uses it)
    import keras

TEMP_PREFIX = ".partial-"
"""Temporary files start with this; :func:`remove_partial_files` clears what a kill left."""


def _fsync(path: Path, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    _fsync(path, os.O_RDONLY | os.O_DIRECTORY)


def replace_durably(source: Path, target: Path) -> None:
    """Rename the complete file ``source`` over ``target`` (same folder) and make both stick."""
    _fsync(source)
    os.replace(source, target)
    fsync_dir(target.parent)


def write_durably(target: Path, write: Callable[[Path], object], mode: int = 0o644) -> None:
    """Call ``write(temp)`` for a temporary path with ``target``'s suffixes, then move it into
    place durably; the temporary file is removed when ``write`` fails."""
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(target.suffixes)
    temp = target.with_name(f"{TEMP_PREFIX}{uuid.uuid4().hex}{suffix}")
    try:
        write(temp)
        os.chmod(temp, mode)
        replace_durably(temp, target)
    finally:
        temp.unlink(missing_ok=True)


def write_text_durably(target: Path, text: str) -> None:
    write_durably(target, lambda temp: temp.write_text(text))


def save_model_durably(model: keras.Model, target: Path) -> None:
    """``model.save`` (a ``.keras`` zip) without ever leaving a torn file at ``target``."""
    write_durably(target, lambda temp: model.save(temp))


def save_weights_durably(model: keras.Model, target: Path) -> None:
    """``model.save_weights`` (a ``.weights.h5``, optimizer state included) likewise."""
    write_durably(target, lambda temp: model.save_weights(temp))


def remove_partial_files(folder: Path) -> int:
    """Delete temporary files a kill left in ``folder`` (not recursive); returns the count."""
    removed = 0
    for path in folder.glob(f"{TEMP_PREFIX}*"):
        path.unlink(missing_ok=True)
        removed += 1
    return removed

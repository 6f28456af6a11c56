"""Durable spool of received instances: ``<study>/<series>/<sop>.dcm``.

A file is written to a temporary name in its final folder, fsynced, renamed
into place and the folder fsynced, so after a crash a spool file is either
complete or absent. Temporary files left by a crash are removed at start-up.
"""

from __future__ import annotations

import errno
import os
import re
import uuid
from collections.abc import Sequence
from pathlib import Path

from daemon.exceptions import SpoolError, SpoolFullError
from model.durable import fsync_dir

TEMP_SUFFIX = ".partial"
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def is_valid_uid(value: str) -> bool:
    """True for a syntactically valid DICOM UID (also makes it safe as a file name)."""
    return 0 < len(value) <= 64 and bool(_UID.match(value))


class Spool:
    def __init__(self, root: Path) -> None:
        self.root = root

    def relative_path(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        for uid in (study_uid, series_uid, sop_uid):
            if not is_valid_uid(uid):
                raise ValueError(f"not a valid UID: {uid!r}")
        return f"{study_uid}/{series_uid}/{sop_uid}.dcm"

    def absolute(self, relative: str) -> Path:
        return self.root / relative

    def write(self, relative: str, chunks: Sequence[bytes | memoryview]) -> None:
        """Write ``chunks`` durably at ``relative``; replaces an existing file atomically.

        Raises :class:`SpoolFullError` when the file system is full (nothing is
        left behind) and :class:`SpoolError` for any other I/O failure.
        """
        target = self.root / relative
        temp = target.with_name(f".{target.name}.{uuid.uuid4().hex}{TEMP_SUFFIX}")
        try:
            self._make_dirs(target.parent)
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                for chunk in chunks:
                    view = memoryview(chunk)
                    while view:
                        written = os.write(fd, view)
                        view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, target)
            fsync_dir(target.parent)
        except OSError as e:
            temp.unlink(missing_ok=True)
            if e.errno in _FULL:
                raise SpoolFullError(f"spool file system is full ({e.strerror})") from e
            raise SpoolError(f"cannot write spool file: {e.strerror}") from e

    def remove(self, relative: str) -> None:
        (self.root / relative).unlink(missing_ok=True)

    def _make_dirs(self, folder: Path) -> None:
        missing: list[Path] = []
        probe = folder
        while not probe.exists():
            missing.append(probe)
            probe = probe.parent
        for path in reversed(missing):
            try:
                path.mkdir()
            except FileExistsError:
                continue
            fsync_dir(path.parent)

    def remove_temp_files(self) -> int:
        """Delete temporary files left by a crash; returns how many were removed."""
        removed = 0
        if not self.root.exists():
            return 0
        for path in self.root.rglob(f"*{TEMP_SUFFIX}"):
            path.unlink(missing_ok=True)
            removed += 1
        return removed


"""Durable spool of received instances: ``<study>/<series>/<sop>.dcm``.

A received instance is written, as it arrives, to a temporary file in the
spool's ``.incoming`` folder (:mod:`daemon.dicom.incoming`) and fsynced; once the
database has decided to keep it, :meth:`Spool.place` links it under a name that
nobody holds in its study's folder and fsyncs that folder. Linking fails instead
of replacing, so an acknowledged file is never overwritten: when ``<sop>.dcm``
is taken (a kept second version, or a file left by a crash) the new copy gets
``<sop>.v<version>.<token>.dcm``. After a crash a spool file is either complete
or absent; temporary files left by a crash are removed at start-up.

The receiver marks the spool root (:data:`MARKER`) when it starts. A worker on another host
reads the spool over a shared mount; where the marker is missing, the mount is missing
(the worker then claims nothing, and a job whose files vanish with the mount is retried
as ``spool_not_mounted`` rather than failed as ``spool_file_missing``).
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
INCOMING = ".incoming"
"""The spool sub-folder of data sets in transfer: one folder per receiver process,
``<host>-<pid>``, so a process cleans up after a dead one without touching a live one's files
(several hosts' receivers may share the spool); see :mod:`daemon.dicom.incoming`."""
MARKER = ".opacityd-spool"
"""A file in the spool root, written by the receiver: its absence means an unmounted spool."""
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
SPOOL_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def is_valid_uid(value: str) -> bool:
    """True for a syntactically valid DICOM UID (also makes it safe as a file name)."""
    return 0 < len(value) <= 64 and bool(_UID.match(value))


def _spool_error(e: OSError, what: str) -> SpoolError:
    if e.errno in SPOOL_FULL_ERRNOS:
        return SpoolFullError(f"spool file system is full ({e.strerror})")
    return SpoolError(f"{what}: {e.strerror}")


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

    def mark(self) -> bool:
        """Write :data:`MARKER` in the root unless it is there; True when it was written.
        Raises :class:`SpoolError` when the root cannot be written."""
        marker = self.root / MARKER
        if marker.is_file():
            return False
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            marker.write_text("opacityd spool root: received instances live below this folder\n")
            fsync_dir(self.root)
        except OSError as e:
            raise _spool_error(e, f"marking the spool root {self.root}") from e
        return True

    def mounted(self) -> bool:
        """Whether this is the spool the receivers write to (:data:`MARKER` is there)."""
        return (self.root / MARKER).is_file()

    def place(self, temp: Path, study_uid: str, series_uid: str, sop_uid: str,
              version: int) -> str:
        """Give the temporary file ``temp`` a final name; returns it relative to the root.

        The name is ``<sop>.dcm`` when free, else ``<sop>.v<version>.<token>.dcm``.
        A hard link never replaces an existing name (it fails with EEXIST), so a
        file that a committed row points to is never touched. The folder is
        fsynced; ``temp`` stays until :meth:`discard`. Raises :class:`SpoolError`
        (or :class:`SpoolFullError`) when the link or the fsync fails; a name
        already linked is then removed again.
        """
        preferred = self.relative_path(study_uid, series_uid, sop_uid)
        folder = preferred.rsplit("/", 1)[0]
        try:
            self._make_dirs(self.root / folder)
        except OSError as e:
            raise _spool_error(e, "cannot make the spool folder") from e
        names = [preferred]
        names += [f"{folder}/{sop_uid}.v{version}.{uuid.uuid4().hex[:12]}.dcm" for _ in range(3)]
        for relative in names:
            try:
                os.link(temp, self.root / relative)
            except FileExistsError:
                continue
            except OSError as e:
                raise _spool_error(e, "cannot place spool file") from e
            try:
                fsync_dir((self.root / relative).parent)
            except OSError as e:
                self.discard(self.root / relative)
                raise _spool_error(e, "cannot place spool file") from e
            return relative
        raise SpoolError(f"no free name for a spool file of version {version}")

    @staticmethod
    def discard(path: Path) -> None:
        """Remove a file that the caller itself created (a temp file or a name it placed)."""
        path.unlink(missing_ok=True)

    def write(self, relative: str, chunks: Sequence[bytes | memoryview]) -> None:
        """Write ``chunks`` durably at ``relative``; replaces an existing file atomically.

        For files whose name is derived from their content (SRs). Received instances go
        through :meth:`place`, which never replaces anything.

        Raises :class:`SpoolFullError` when the file system is full (nothing is
        left behind) and :class:`SpoolError` for any other I/O failure.
        """
        target = self.root / relative
        temp = target.with_name(f".{target.name}.{uuid.uuid4().hex}{TEMP_SUFFIX}")
        try:
            self._make_dirs(target.parent)
            self._write_new(temp, chunks)
            os.replace(temp, target)
            fsync_dir(target.parent)
        except OSError as e:
            temp.unlink(missing_ok=True)
            raise _spool_error(e, "cannot write spool file") from e

    @staticmethod
    def _write_new(path: Path, chunks: Sequence[bytes | memoryview]) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)

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
            if INCOMING in path.relative_to(self.root).parts[:1]:
                continue  # receivers' files in transfer: see daemon.dicom.incoming.remove_stale
            path.unlink(missing_ok=True)
            removed += 1
        return removed


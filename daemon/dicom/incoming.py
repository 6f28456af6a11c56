"""Receiving a C-STORE data set straight into the spool, written once and never held whole.

pynetdicom can write a received data set to a file as its fragments arrive
(``_config.STORE_RECV_CHUNKED_DATASET``): it opens ``NamedTemporaryFile(delete=False)``,
writes the preamble, ``DICM`` and the File Meta Information, then each data set fragment,
and hands the handler the file's path (``Event.dataset_path``); after the handler it closes
the file and unlinks that name. We give it, for the associations of a registered AE, an
:class:`IncomingFile` in the spool's ``.incoming`` folder instead of one in ``/tmp``:

- same file system as the spool, so keeping the instance is a hard link (:meth:`Spool.place`),
  and pynetdicom's unlink afterwards only drops the temporary name;
- the sha256 of the data set (everything after the File Meta Information, as the database
  records it) is computed as the bytes pass, so nothing is read back;
- the bytes reach the page cache while the transfer goes on, so the kernel writes most of them
  back before the handler's fsync;
- a write error (a full disk) is kept and reported by the handler as a 0xA700 refusal,
  instead of breaking pynetdicom's reader thread and aborting the association.

Associations of other AEs in the process (a test's PACS) get pynetdicom's own temporary file.
A file whose association ends before its handler ran (an abort mid-transfer) is removed when
the association closes; the files of a process that died are removed with its folder
(:func:`remove_stale`: at start-up, and by ``serve`` when a receiver process of its own dies).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import struct
import threading
import uuid
import weakref
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.filereader import read_partial
from pydicom.uid import DeflatedExplicitVRLittleEndian
from pynetdicom import AE, _config, dimse_messages
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider

from daemon.pids import pid_alive
from daemon.spool import INCOMING, TEMP_SUFFIX

_META_PREFIX = 128 + 4 + 12
"""Preamble, ``DICM`` and the File Meta Information Group Length element (explicit VR UL)."""


def incoming_folder(spool_root: Path) -> Path:
    """This process's folder for data sets in transfer."""
    return spool_root / INCOMING / f"{socket.gethostname()}-{os.getpid()}"


def remove_stale(spool_root: Path, pid: int | None = None) -> int:
    """Remove the incoming folders of this host's dead receiver processes (or of ``pid``,
    which the caller knows is dead); returns how many files went with them."""
    parent = spool_root / INCOMING
    host = socket.gethostname()
    removed = 0
    for folder in parent.iterdir() if parent.is_dir() else ():
        owner, _, number = folder.name.rpartition("-")
        if owner != host or not number.isdigit():
            continue
        dead = int(number) == pid if pid is not None else not pid_alive(int(number))
        if not dead:
            continue
        removed += sum(1 for p in folder.iterdir() if p.is_file())
        shutil.rmtree(folder, ignore_errors=True)
    return removed


class IncomingFile:
    """The file-like object pynetdicom writes one received data set to."""

    def __init__(self, folder: Path) -> None:
        self.name = str(folder / f".{uuid.uuid4().hex}.dcm{TEMP_SUFFIX}")
        self.file = self  # pynetdicom flushes ``.file`` after each fragment
        self.error: OSError | None = None
        self.body_bytes = 0
        self._written = 0
        self._head = bytearray()
        self._body_offset: int | None = None
        self._hash = hashlib.sha256()
        self._fd: int | None = None
        try:
            self._fd = os.open(self.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        except OSError as e:  # kept like a write error: answered 0xA700 by the handler
            self.error = e
        self._created = self._fd is not None

    @property
    def path(self) -> Path:
        return Path(self.name)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        self._digest(view)
        self._written += len(view)
        if self.error is None and self._fd is not None:
            try:
                while view:
                    view = view[os.write(self._fd, view):]
            except OSError as e:
                self.error = e
        return len(data)

    def _digest(self, view: memoryview) -> None:
        if self._body_offset is None:
            self._head += view[:_META_PREFIX - len(self._head)]
            if len(self._head) == _META_PREFIX:
                group_length = struct.unpack_from("<I", self._head, _META_PREFIX - 4)[0]
                self._body_offset = _META_PREFIX + int(group_length)
        if self._body_offset is not None:
            skip = max(self._body_offset - self._written, 0)
            if skip < len(view):
                self._hash.update(view[skip:])
                self.body_bytes += len(view) - skip

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    def flush(self) -> None:
        """Writes are unbuffered ``os.write`` calls: nothing to flush."""

    def sync(self) -> None:
        """fsync the data written; raises the kept write error, or the fsync's."""
        if self.error is not None:
            raise self.error
        if self._fd is None:
            raise OSError(f"{self.name} is already closed")
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def discard(self) -> None:
        self.close()
        if self._created:
            Path(self.name).unlink(missing_ok=True)


class Incoming:
    """The incoming files of one AE's associations, from creation to the handler."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._lock = threading.Lock()
        self._open: dict[str, tuple[Association, IncomingFile]] = {}

    def create(self, assoc: Association) -> IncomingFile:
        created = IncomingFile(self.folder)
        with self._lock:
            self._open[created.name] = (assoc, created)
        return created

    def take(self, path: str | os.PathLike[str]) -> IncomingFile | None:
        """The file pynetdicom wrote the event's data set to; the handler owns it from now."""
        with self._lock:
            found = self._open.pop(str(path), None)
        return found[1] if found else None

    def abandon(self, assoc: Association) -> int:
        """Remove the files of ``assoc`` that no handler took (its transfer was cut off)."""
        with self._lock:
            names = [name for name, (owner, _) in self._open.items() if owner is assoc]
            files = [self._open.pop(name)[1] for name in names]
        for incoming in files:
            incoming.discard()
        return len(files)


_routes: weakref.WeakKeyDictionary[AE, Incoming] = weakref.WeakKeyDictionary()
_install_lock = threading.Lock()
_pynetdicom_temporary_file = dimse_messages.NamedTemporaryFile


def _temporary_file(*args: Any, **kwargs: Any) -> Any:
    """Stands in for ``NamedTemporaryFile`` in pynetdicom's DIMSE decoder (its reader thread)."""
    thread = threading.current_thread()
    if isinstance(thread, DULServiceProvider):
        assoc = thread.assoc
        route = _routes.get(assoc.ae)
        if route is not None:
            return route.create(assoc)
    return _pynetdicom_temporary_file(*args, **kwargs)


def receive_into(ae: AE, folder: Path) -> Incoming:
    """Make the associations of ``ae`` write received data sets into ``folder``."""
    with _install_lock:
        _config.STORE_RECV_CHUNKED_DATASET = True
        dimse_messages.NamedTemporaryFile = _temporary_file  # type: ignore[assignment]
        route = Incoming(folder)
        _routes[ae] = route
    return route


_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)
_UNDEFINED = 0xFFFFFFFF
_DEFER = 4096
"""Values longer than this (the pixel data) are skipped, not read, while parsing."""


def read_header(path: Path) -> Dataset:
    """The whole data set parsed, its long values (the pixel data) skipped, not read.

    Raises ``ValueError`` when the pixel data element claims more bytes than the file holds
    (a truncated transfer), and pydicom's errors for a malformed data set."""
    with path.open("rb") as fp:
        size = os.fstat(fp.fileno()).st_size
        ds = read_partial(fp, defer_size=_DEFER)
    if ds.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        return ds  # offsets are in the inflated stream, not in the file
    for tag in _PIXEL_TAGS:
        if tag in ds:
            raw = ds.get_item(tag)
            length = getattr(raw, "length", _UNDEFINED)
            value_tell = getattr(raw, "value_tell", 0)
            if length != _UNDEFINED and value_tell + length > size:
                raise ValueError(f"pixel data of {length} bytes is cut off at {size - value_tell}")
    return ds

"""Named locks across processes, for periodic work that must not run twice at once.

Several ``serve`` processes may share one database (PostgreSQL, docs/operations.md "Scaling
out"). Work on items that can be claimed row by row (jobs, deliveries, closing studies) uses
``FOR UPDATE SKIP LOCKED``; work that is one sweep over many rows (retention's purge) takes
one named lock instead:

- PostgreSQL: a session-level advisory lock (``pg_try_advisory_lock``) on a connection held
  for the sweep. The server releases it when that connection ends, also when the process is
  killed, so a crash never leaves it held.
- SQLite (processes on one host): ``flock`` on a file beside the database; the kernel releases
  it when the process dies.
"""

from __future__ import annotations

import fcntl
import os
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine

_NAMESPACE = 0x6F70  # "op" in ASCII: opacityd's advisory-lock keys, apart from other users'.


def advisory_key(name: str) -> int:
    """The 64-bit advisory-lock key of ``name``: opacityd's namespace in the high 32 bits."""
    return (_NAMESPACE << 32) | zlib.crc32(name.encode())


@contextmanager
def exclusive(engine: Engine, name: str) -> Iterator[bool]:
    """Try to hold the lock ``name`` for the block, without waiting.

    Yields True when this process holds it, False when another one does (the caller skips
    its sweep this time). Raises SQLAlchemyError when the database cannot be reached, OSError
    when the SQLite lock file cannot be opened.
    """
    if engine.dialect.name == "postgresql":
        key = advisory_key(name)
        with engine.connect() as conn:
            held = bool(conn.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar())
            conn.commit()
            try:
                yield held
            finally:
                if held:
                    conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                    conn.commit()
        return
    database = engine.url.database
    if not database or database == ":memory:":
        yield True  # one process by construction
        return
    path = Path(f"{database}.{name}.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextmanager
def sqlite_writers_queue(engine: Engine, name: str) -> Iterator[None]:
    """On SQLite, wait for the lock ``name`` (``flock`` on a file beside the database) for the
    block; on other databases, nothing.

    For writers of several processes that would otherwise meet on SQLite's write lock, whose
    busy handler sleeps 1, 2, 5, 10 ... ms between tries: the kernel wakes the next process
    waiting on the ``flock`` as soon as it is released. Raises OSError when the lock file
    cannot be opened."""
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        yield
        return
    fd = os.open(f"{database}.{name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)

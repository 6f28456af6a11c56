"""Group commit: one writer thread records the instances of every association of a process.

Each C-STORE handler fsyncs its own file, then hands its record to :class:`GroupCommitter`
and waits. The writer takes every record waiting (up to ``max_batch``) and, in one
transaction, lets the database decide NEW or DUPLICATE for each in turn (a savepoint each),
links each kept file under a free name (:meth:`Spool.place`), and commits once. Only then
are the handlers woken, each with its own outcome: no success is answered before its own
bytes and row are durable, and one commit (one WAL fsync) covers several instances.

Before, each association's thread ran its own transaction; under parallel associations they
queued on SQLite's write lock, whose busy handler sleeps 1, 2, 5, 10 ... ms between tries.

With several receiver processes on SQLite, their writers queue on an ``flock`` beside the
database before they begin (:func:`db.locks.sqlite_writers_queue`), so the next one starts as
soon as the last commits instead of after SQLite's busy-handler sleeps.

A record whose file cannot be placed (a full disk) fails alone: its savepoint is rolled back
and the others commit. A database failure fails the whole batch with 0xA700; after a COMMIT
that raised, each record's placed file is kept only where a committed row points to it.
An unexpected error fails the batch, is logged with its traceback, and the writer goes on.
"""

from __future__ import annotations

import queue as queues
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import structlog
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from daemon.dicom.statuses import StoreStatus
from daemon.exceptions import SpoolError, SpoolFullError
from daemon.spool import Spool
from db import queue
from db.engine import read_only
from db.locks import sqlite_writers_queue

log = structlog.get_logger("opacityd.receiver")


class CommitRefused(Exception):
    """Why a record was not committed: a 0xA700 status with its reason and comment."""

    def __init__(self, reason: str, comment: str) -> None:
        super().__init__(comment)
        self.status = StoreStatus.OUT_OF_RESOURCES
        self.reason = reason
        self.comment = comment


@dataclass
class _Pending:
    record: queue.InstanceRecord
    temp: Path | None
    done: threading.Event = field(default_factory=threading.Event)
    stored: queue.Stored | None = None
    refused: CommitRefused | None = None
    placed: list[str] = field(default_factory=list)
    """Names this record's file was linked under (a lost race may place it twice)."""
    keep: set[str] = field(default_factory=set)
    """Placed names to keep although the record was refused (its COMMIT raised, yet a row
    points to them)."""


def _spool_refusal(e: SpoolError) -> CommitRefused:
    if isinstance(e, SpoolFullError):
        return CommitRefused("spool_full", "out of disk space")
    return CommitRefused("spool_error", str(e))


class GroupCommitter:
    """The writer thread of one receiver process (see the module's text)."""

    def __init__(self, sessions: sessionmaker[Session], spool: Spool,
                 policy: queue.DuplicatePolicy, max_batch: int = 64,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.sessions = sessions
        bind = sessions.kw.get("bind")
        assert isinstance(bind, Engine), "the session factory is bound to one engine"
        self.engine = bind
        self.spool = spool
        self.policy = policy
        self.max_batch = max_batch
        self.clock = clock
        self.batches = 0
        self.records = 0
        self._queue: queues.SimpleQueue[_Pending | None] = queues.SimpleQueue()
        self._lock = threading.Lock()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="group-commit", daemon=True)
        self._thread.start()

    def record(self, record: queue.InstanceRecord, temp: Path | None) -> queue.Stored:
        """Record ``record`` (placing ``temp`` if kept) in the next commit; returns once that
        commit is durable. Raises :class:`CommitRefused` when it is not."""
        pending = _Pending(record, temp)
        with self._lock:
            if self._stopped:
                raise CommitRefused("shutting_down", "the receiver is stopping")
            self._queue.put(pending)
        pending.done.wait()
        if pending.refused is not None:
            raise pending.refused
        assert pending.stored is not None
        return pending.stored

    def stop(self) -> None:
        """Finish what is queued, then end the thread; later records are refused."""
        with self._lock:
            self._stopped = True
            self._queue.put(None)
        self._thread.join()
        log.info("group_commit_stopped", batches=self.batches, records=self.records,
                 mean_batch=round(self.records / self.batches, 2) if self.batches else None)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            stopping = False
            while len(batch) < self.max_batch:
                try:
                    more = self._queue.get_nowait()
                except queues.Empty:
                    break
                if more is None:
                    stopping = True
                    break
                batch.append(more)
            try:
                self._commit(batch)
            except Exception as e:  # noqa: BLE001 - the writer must outlive any one batch
                log.exception("group_commit_failed", records=len(batch), error=type(e).__name__)
                for pending in batch:
                    if pending.stored is None and pending.refused is None:
                        pending.refused = CommitRefused("internal_error",
                                                        f"internal error ({type(e).__name__})")
            finally:
                for pending in batch:
                    self._discard_unrecorded(pending)
                    pending.done.set()
            if stopping:
                return

    def _commit(self, batch: list[_Pending]) -> None:
        committing = False
        now = self.clock()
        try:
            with sqlite_writers_queue(self.engine, "receivers"), self.sessions() as session:
                with session.begin():
                    for pending in batch:
                        self._record_one(session, pending, now)
                    committing = True
            self.batches += 1
            self.records += len(batch)
        except SQLAlchemyError as e:
            live = [p for p in batch if p.refused is None]
            for pending in live:
                pending.stored = None
                pending.refused = CommitRefused("database_error",
                                                f"database unavailable ({type(e).__name__})")
            if committing:
                self._keep_recorded(live)

    def _record_one(self, session: Session, pending: _Pending, now: datetime) -> None:
        def place(version: int) -> str | None:
            if pending.temp is None:
                return None
            rec = pending.record
            relative = self.spool.place(pending.temp, rec.study_uid, rec.series_uid,
                                        rec.sop_instance_uid, version)
            pending.placed.append(relative)
            return relative

        savepoint = session.begin_nested()
        try:
            pending.stored = queue.record_instance(session, pending.record, now,
                                                   policy=self.policy, place=place)
            savepoint.commit()
        except SpoolError as e:
            savepoint.rollback()
            pending.stored, pending.refused = None, _spool_refusal(e)

    def _discard_unrecorded(self, pending: _Pending) -> None:
        """Remove every name placed for ``pending`` that no committed row points to."""
        keep = {pending.stored.spool_path} if pending.stored is not None else pending.keep
        for relative in pending.placed:
            if relative not in keep:
                self.spool.discard(self.spool.absolute(relative))

    def _keep_recorded(self, batch: list[_Pending]) -> None:
        """After a COMMIT that raised (its outcome unknown on a client-server database): keep
        the placed names that a committed row points to. When even that cannot be read, every
        placed name is kept: an orphan file costs disk, a removed acknowledged one a loss
        (each handler still answers 0xA700, and the sender's retry is a duplicate)."""
        placed = [name for p in batch for name in p.placed]
        if not placed:
            return
        try:
            with read_only(self.sessions) as session:
                recorded = set(queue.recorded_spool_paths(session, placed))
        except SQLAlchemyError as e:
            log.warning("spool_file_kept_commit_unknown", spool_files=len(placed),
                        error=type(e).__name__)
            recorded = set(placed)
        for pending in batch:
            pending.keep = recorded.intersection(pending.placed)

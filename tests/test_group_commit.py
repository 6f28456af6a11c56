"""The receiver's writer thread (daemon/dicom/group_commit.py) on a real SQLite file and spool.

Records handed in while the database is locked by another process's transaction wait, then
go in together; a record whose file cannot be placed fails alone; nothing is answered before
its row is committed.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from daemon.dicom.group_commit import CommitRefused, GroupCommitter
from daemon.spool import Spool
from db import migrate, queue
from db.engine import create_db_engine, make_session_factory, read_only
from db.models import Instance


def _record(n: int) -> queue.InstanceRecord:
    study, sop = f"1.2.3.{n}", f"1.2.3.{n}.1.1"
    return queue.InstanceRecord(
        study_uid=study, series_uid=f"{study}.1", sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1", transfer_syntax_uid="1.2.840.10008.1.2.1",
        modality="CR", body_part="CHEST", view_position="PA", accession_number=None,
        eligible=True, eligibility_reason="eligible", spool_path=None, size_bytes=4,
        calling_ae="TEST", content_hash=hashlib.sha256(sop.encode()).hexdigest())


@pytest.fixture
def db_file(tmp_path: Path) -> Path:
    return tmp_path / "opacityd.sqlite3"


@pytest.fixture
def sessions(db_file: Path) -> Iterator[sessionmaker[Session]]:
    engine = create_db_engine(f"sqlite:///{db_file}")
    migrate.upgrade(engine)
    yield make_session_factory(engine)
    engine.dispose()


def _incoming(spool: Spool, n: int) -> Path:
    folder = spool.root / ".incoming" / "test"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f".{n}.partial"
    path.write_bytes(b"DICM")
    return path


def _rows(sessions: sessionmaker[Session]) -> dict[str, str | None]:
    with read_only(sessions) as s:  # WAL: reads while another process holds the write lock
        return dict(s.execute(sa.select(Instance.sop_instance_uid, Instance.spool_path)).all())


def test_records_waiting_on_a_locked_database_go_in_together_once_it_is_free(
        tmp_path: Path, db_file: Path, sessions: sessionmaker[Session]) -> None:
    spool = Spool(tmp_path / "spool")
    committer = GroupCommitter(sessions, spool, "keep_first")
    other = sqlite3.connect(db_file, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holds SQLite's one write lock
    outcomes: dict[int, queue.StoreOutcome] = {}

    def store(n: int) -> None:
        outcomes[n] = committer.record(_record(n), _incoming(spool, n)).outcome

    threads = [threading.Thread(target=store, args=(n,)) for n in range(12)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    assert outcomes == {}, "a record was answered while its row could not be committed"
    assert _rows(sessions) == {}
    other.execute("ROLLBACK")
    for t in threads:
        t.join(timeout=30)
    committer.stop()
    assert outcomes == {n: queue.StoreOutcome.NEW for n in range(12)}
    rows = _rows(sessions)
    assert len(rows) == 12 and all(path and (spool.root / path).read_bytes() == b"DICM"
                                   for path in rows.values())
    # The first record's transaction waited on the lock; the other eleven went in behind it.
    assert committer.records == 12 and committer.batches <= 3, (committer.batches, committer.records)


def test_a_file_that_cannot_be_placed_fails_alone_and_leaves_nothing(
        tmp_path: Path, sessions: sessionmaker[Session]) -> None:
    spool = Spool(tmp_path / "spool")
    blocked = _record(7)
    (spool.root / blocked.study_uid).parent.mkdir(parents=True, exist_ok=True)
    (spool.root / blocked.study_uid).write_bytes(b"a file where the study's folder goes")
    committer = GroupCommitter(sessions, spool, "keep_first")
    results: dict[int, str] = {}

    def store(n: int) -> None:
        try:
            committer.record(_record(n), _incoming(spool, n))
            results[n] = "stored"
        except CommitRefused as e:
            results[n] = e.reason

    threads = [threading.Thread(target=store, args=(n,)) for n in (5, 6, 7, 8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    committer.stop()
    assert results == {5: "stored", 6: "stored", 7: "spool_error", 8: "stored"}
    assert sorted(_rows(sessions)) == sorted(_record(n).sop_instance_uid for n in (5, 6, 8))
    placed = sorted(p.name for p in spool.root.rglob("*.dcm"))
    assert placed == sorted(f"{_record(n).sop_instance_uid}.dcm" for n in (5, 6, 8))


def test_after_stop_a_record_is_refused_not_left_waiting(
        tmp_path: Path, sessions: sessionmaker[Session]) -> None:
    spool = Spool(tmp_path / "spool")
    committer = GroupCommitter(sessions, spool, "keep_first")
    committer.stop()
    with pytest.raises(CommitRefused) as info:
        committer.record(_record(1), _incoming(spool, 1))
    assert info.value.reason == "shutting_down"

"""Engine and session setup. The only dialect-aware code in the project lives here.

One engine per process: the CLI creates it with :func:`create_db_engine` and
passes it down. SQLite gets WAL, ``synchronous=FULL`` (a committed row survives
power loss, which is what a C-STORE success promises), foreign keys, a busy
timeout, and ``BEGIN IMMEDIATE`` so that concurrent writers queue on the busy
timeout instead of failing when a read transaction upgrades to a write.

Read-only work (metrics, health, listings, the worklist, retention's scans) uses
:func:`read_only` instead of :func:`unit_of_work`: a deferred ``BEGIN`` on SQLite,
which in WAL mode reads a snapshot and never takes or waits for the write lock,
and ``SET TRANSACTION READ ONLY`` on PostgreSQL. Reading never blocks receiving.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from db.exceptions import DatabaseUnreachable

PG_POOL_SIZE, PG_MAX_OVERFLOW = 8, 12
"""Connections one process holds open to PostgreSQL, and how many more it may open at peaks
(docs/operations.md, "Scaling out", adds them up per process kind)."""
PG_CONNECT_TIMEOUT_S = 10
"""A server that does not answer a connection attempt within this is treated as down."""

READ_ONLY_OPTION = "opacityd_read_only"
"""Execution option marking a connection whose transactions only read (see :func:`read_only`)."""


def create_db_engine(url: str, busy_timeout_ms: int = 10_000) -> Engine:
    """Return the process's engine for ``url``, configured for its dialect."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "postgresql":
        # pre-ping: a connection broken by a server restart is replaced, not handed out.
        return sa.create_engine(url, pool_pre_ping=True, pool_size=PG_POOL_SIZE,
                                max_overflow=PG_MAX_OVERFLOW,
                                connect_args={"connect_timeout": PG_CONNECT_TIMEOUT_S})
    if parsed.get_backend_name() != "sqlite":
        return sa.create_engine(url, pool_pre_ping=True)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(
        url,
        connect_args={"timeout": busy_timeout_ms / 1000, "check_same_thread": False},
        pool_size=16,
        max_overflow=16,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the driver, decide where transactions begin.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        _set_wal(cur, busy_timeout_ms / 1000)
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        # A reader takes no lock up front (WAL gives it a snapshot); a writer takes the write
        # lock at BEGIN, so it waits on busy_timeout rather than failing on an upgrade.
        if conn.get_execution_options().get(READ_ONLY_OPTION):
            conn.exec_driver_sql("BEGIN")
        else:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _set_wal(cur: Any, timeout_s: float) -> None:
    """``PRAGMA journal_mode=WAL``, retried while the database is locked. SQLite answers a
    journal mode change on a new database that another connection is writing (processes
    starting together, one migrating) with SQLITE_BUSY at once, without its busy handler."""
    deadline = time.monotonic() + max(timeout_s, 1.0)
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() >= deadline:
                raise
            time.sleep(0.02)


def display_url(engine: Engine) -> str:
    """The engine's URL as it may be shown and logged: the password hidden."""
    return engine.url.render_as_string(hide_password=True)


def check_reachable(engine: Engine) -> None:
    """Open and close one connection, so that a process starts only with a database it can
    reach. Raises :class:`DatabaseUnreachable` (URL without its password, the driver's reason)."""
    try:
        # A reader's BEGIN: a SQLite database that another process is writing is reachable.
        with engine.connect() as conn:
            conn.execution_options(**{READ_ONLY_OPTION: True}).exec_driver_sql("SELECT 1")
    except DBAPIError as e:
        reason = str(e.orig).strip().splitlines()[0] if e.orig is not None else type(e).__name__
        raise DatabaseUnreachable(display_url(engine), reason) from e


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def unit_of_work(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One session and one transaction: committed on success, rolled back on error."""
    with factory() as session, session.begin():
        yield session


@contextmanager
def read_only(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One session in a transaction that only reads and takes no write lock.

    SQLite: a deferred ``BEGIN`` (a WAL snapshot; never waits for a writer, never holds
    one up). PostgreSQL: ``SET TRANSACTION READ ONLY`` (the server refuses any write).
    The transaction is rolled back at the end, so nothing done inside it is kept; only
    reads belong here (a write would have to take the lock that this avoids). Objects
    loaded inside stay readable afterwards (detached, not expired).
    """
    bind = factory.kw["bind"]
    # Closing the session ends the transaction (a rollback) without expiring what was
    # loaded, so objects read inside stay readable after the block.
    with factory(bind=bind.execution_options(**{READ_ONLY_OPTION: True})) as session:
        session.begin()
        if bind.dialect.name == "postgresql":
            session.execute(sa.text("SET TRANSACTION READ ONLY"))
        yield session


@contextmanager
def read_only_connection(engine: Engine) -> Iterator[sa.Connection]:
    """A Core connection whose transactions begin as :func:`read_only`'s do."""
    with engine.connect() as conn:
        conn.execution_options(**{READ_ONLY_OPTION: True})
        if engine.dialect.name == "postgresql":
            conn.exec_driver_sql("SET TRANSACTION READ ONLY")
        yield conn


def sqlite_pragmas(engine: Engine) -> dict[str, Any]:
    """The effective SQLite settings (empty for other dialects); used by tests and `status`."""
    if engine.dialect.name != "sqlite":
        return {}
    with engine.connect() as conn:
        return {
            name: conn.exec_driver_sql(f"PRAGMA {name}").scalar()
            for name in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")
        }


_Select = TypeVar("_Select", bound=sa.Select)  # type: ignore[type-arg]  # any row shape


def locks_rows(session: Session) -> bool:
    """Whether claims must lock rows: PostgreSQL yes; SQLite serialises writers already."""
    return session.get_bind().dialect.name == "postgresql"


def for_claim(stmt: _Select, session: Session) -> _Select:
    """Candidate rows for a claim: ``FOR UPDATE SKIP LOCKED`` where the dialect has it."""
    if locks_rows(session):
        return stmt.with_for_update(skip_locked=True)
    return stmt

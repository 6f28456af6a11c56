"""Engine and session setup. The only dialect-aware code in the project lives here.

One engine per process: the CLI creates it with :func:`create_db_engine` and
passes it down. SQLite gets WAL, ``synchronous=FULL`` (a committed row survives
power loss, which is what a C-STORE success promises), foreign keys, a busy
timeout, and ``BEGIN IMMEDIATE`` so that concurrent writers queue on the busy
timeout instead of failing when a read transaction upgrades to a write.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker


def create_db_engine(url: str, busy_timeout_ms: int = 10_000) -> Engine:
    """Return the process's engine for ``url``, configured for its dialect."""
    parsed = sa.make_url(url)
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
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def unit_of_work(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One session and one transaction: committed on success, rolled back on error."""
    with factory() as session, session.begin():
        yield session


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

"""Schema migrations with alembic, applied programmatically at start-up.

The upgrade runs in one transaction. On SQLite that transaction starts with
``BEGIN IMMEDIATE``; on PostgreSQL it first takes a transaction-level advisory
lock (DDL is transactional there). Either way, processes starting together on
one database (several receivers, workers) serialise, and all but the first find
the schema already at head.
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine

from db.engine import read_only_connection
from db.locks import advisory_key

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def _alembic_config() -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def current_revision(engine: Engine) -> str | None:
    """The schema's revision, read without the write lock (every CLI command asks)."""
    with read_only_connection(engine) as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str | None:
    return ScriptDirectory.from_config(_alembic_config()).get_current_head()


def upgrade(engine: Engine) -> tuple[str | None, str | None]:
    """Bring the schema to head. Returns (revision before, revision after), both read
    under the lock, so a process that waited for another's upgrade reports no change."""
    cfg = _alembic_config()
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": advisory_key("migrate")})
        before = MigrationContext.configure(conn).get_current_revision()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    return before, current_revision(engine)

"""The purge job: delete spooled pixel data that retention allows (db/retention.py decides)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import structlog
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from daemon.config import Config
from daemon.spool import Spool
from db import retention
from db.engine import read_only, unit_of_work
from db.locks import exclusive

log = structlog.get_logger("opacityd.retention")


@dataclass(frozen=True)
class PurgeSummary:
    files: int
    bytes: int
    studies: int
    candidates: list[retention.PurgeCandidate]


def purge(config: Config, sessions: sessionmaker[Session], spool: Spool, *, dry_run: bool = False,
          actor: str = "retention") -> PurgeSummary:
    """Delete what may go (or only list it, with ``dry_run``); rows are marked after deletion,
    so a crash in between leaves a file already gone, which the next run marks.

    One sweep at a time across every process sharing the database (``db.locks``): while
    another process purges, this one returns an empty summary and logs ``purge_skipped``.
    """
    with exclusive(sessions.kw["bind"], "retention") as held:
        if not held:
            log.info("purge_skipped", reason="another_process_is_purging", actor=actor)
            return PurgeSummary(0, 0, 0, [])
        return _purge(config, sessions, spool, dry_run, actor)


def _purge(config: Config, sessions: sessionmaker[Session], spool: Spool, dry_run: bool,
           actor: str) -> PurgeSummary:
    r = config.retention
    # The scan only reads (no write lock, so receiving goes on); marking is a write.
    with read_only(sessions) as session:
        found = retention.candidates(session, datetime.now(UTC), r.delivered_hours, r.ineligible_hours)
    summary = PurgeSummary(len(found), sum(c.size_bytes for c in found),
                           len({c.study_uid for c in found}), found)
    if dry_run or not found:
        return summary
    for candidate in found:
        spool.remove(candidate.spool_path)
    with unit_of_work(sessions) as session:
        retention.mark_purged(session, found, actor, datetime.now(UTC))
    log.info("spool_purged", files=summary.files, bytes=summary.bytes, studies=summary.studies,
             actor=actor)
    return summary


def purge_job(config: Config, sessions: sessionmaker[Session], spool: Spool) -> None:
    """The scheduler's entry: errors are logged, the next run tries again."""
    try:
        purge(config, sessions, spool)
    except (SQLAlchemyError, OSError) as e:
        log.error("purge_failed", error=type(e).__name__, detail=str(e)[:200])

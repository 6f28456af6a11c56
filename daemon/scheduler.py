"""Periodic jobs run by apscheduler inside `opacityd serve`: study completion, SR delivery,
retention (purge)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import structlog
from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from daemon.config import Config
from daemon.dicom.sender import send_due
from daemon.retention import purge_job
from daemon.spool import Spool
from db import queue
from db.engine import read_only, unit_of_work

log = structlog.get_logger("opacityd.scheduler")


def complete_studies(sessions: sessionmaker[Session], quiet_period: timedelta) -> int:
    """Close quiet studies and enqueue their jobs; returns how many were closed.

    A database error is logged and the next tick tries again.
    """
    try:
        with read_only(sessions) as session:
            if not queue.any_quiet_study(session, quiet_period, datetime.now(UTC)):
                return 0
        with unit_of_work(sessions) as session:
            closed = queue.complete_quiet_studies(session, quiet_period, datetime.now(UTC))
    except SQLAlchemyError as e:
        log.error("study_completion_failed", error=type(e).__name__, detail=str(e)[:200])
        return 0
    for c in closed:
        log.info("study_closed", study_uid=c.study_uid, state=c.state.value,
                 revision=c.revision, job_id=c.job_id)
    return len(closed)


def build_scheduler(config: Config, sessions: sessionmaker[Session],
                    spool: Spool | None = None) -> BackgroundScheduler:
    """Study completion, and with a spool, delivery of due SRs."""
    cfg = config.scheduler
    scheduler = BackgroundScheduler(timezone=UTC)
    scheduler.add_job(
        complete_studies, "interval", seconds=cfg.check_interval_s,
        args=(sessions, timedelta(seconds=cfg.study_quiet_period_s)),
        id="complete_studies", max_instances=1, coalesce=True, misfire_grace_time=None,
    )
    if spool is not None and config.retention.enabled:
        scheduler.add_job(
            purge_job, "interval", seconds=config.retention.check_interval_s,
            args=(config, sessions, spool), id="purge", max_instances=1, coalesce=True,
            misfire_grace_time=None,
        )
    if spool is not None and config.delivery.enabled:
        scheduler.add_job(
            send_due, "interval", seconds=config.delivery.poll_interval_s,
            args=(config, sessions, spool), id="send_due", max_instances=1, coalesce=True,
            misfire_grace_time=None,
        )
    return scheduler

"""The sender's tests' view of one configured daemon without its processes: the config, a
migrated database and the spool (tests/test_sender.py, tests/test_hl7.py)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from daemon.config import Config
from daemon.spool import Spool
from db import migrate
from db.engine import create_db_engine, make_session_factory, unit_of_work
from db.models import AuditEvent, Delivery
from db.states import AuditAction, DeliveryState


@dataclass
class Env:
    config: Config
    sessions: sessionmaker[Session]
    spool: Spool

    @classmethod
    def open(cls, config: Config) -> Env:
        """The config's database, migrated, and its spool."""
        engine = create_db_engine(config.database_url)
        migrate.upgrade(engine)
        return cls(config, make_session_factory(engine), Spool(config.spool_dir))

    def deliveries(self) -> list[Delivery]:
        with unit_of_work(self.sessions) as s:
            return list(s.scalars(sa.select(Delivery).order_by(Delivery.id)))

    def make_due(self) -> None:
        """As if the retry delay (or a claim) had passed."""
        with unit_of_work(self.sessions) as s:
            s.execute(sa.update(Delivery).where(Delivery.state == DeliveryState.PENDING)
                      .values(next_attempt_at=datetime.now(UTC) - timedelta(seconds=1)))

    def audit(self, action: AuditAction) -> list[AuditEvent]:
        with unit_of_work(self.sessions) as s:
            return list(s.scalars(sa.select(AuditEvent).where(AuditEvent.action == action)
                                  .order_by(AuditEvent.id)))

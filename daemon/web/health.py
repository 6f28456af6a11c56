"""Liveness and readiness, shared by /healthz, /readyz and the systemd watchdog."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from daemon.config import Config
from daemon.disk import DiskGuard
from db.engine import read_only


def ready_marker(config: Config, pid: int) -> Path:
    """Written by a worker once its model is loaded; `serve` reads it for READY and /readyz."""
    return config.state_dir / "run" / f"worker-{pid}.ready"


@dataclass(frozen=True)
class Check:
    ok: bool
    detail: str


class Health:
    """``liveness`` gates the watchdog (a restart would help); ``readiness`` adds the model,
    the supervised worker (failing while it keeps dying), the receiver's slots (failing while
    senders are turned away) and the disk watermark (a restart of `serve` would not help, but
    senders and operators should know)."""

    def __init__(self, sessions: sessionmaker[Session], disk: DiskGuard,
                 scheduler_running: Callable[[], bool], receiver_listening: Callable[[], bool],
                 model_loaded: Callable[[], Check],
                 worker: Callable[[], Check] | None = None,
                 receiver_slots: Callable[[], Check] | None = None) -> None:
        self.sessions = sessions
        self.disk = disk
        self.scheduler_running = scheduler_running
        self.receiver_listening = receiver_listening
        self.model_loaded = model_loaded
        self.worker = worker
        self.receiver_slots = receiver_slots

    def _database(self) -> Check:
        try:
            with read_only(self.sessions) as session:  # /readyz never waits for a writer
                session.execute(sa.text("SELECT 1"))
        except SQLAlchemyError as e:
            return Check(False, f"database unreachable: {type(e).__name__}")
        return Check(True, "reachable")

    def liveness(self) -> dict[str, Check]:
        scheduler, receiver = self.scheduler_running(), self.receiver_listening()
        return {
            "database": self._database(),
            "scheduler": Check(scheduler, "running" if scheduler else "stopped"),
            "receiver": Check(receiver, "listening" if receiver else "not listening"),
        }

    def readiness(self) -> dict[str, Check]:
        checks = self.liveness()
        checks["model"] = self.model_loaded()
        if self.worker is not None:
            checks["worker"] = self.worker()
        if self.receiver_slots is not None:
            checks["receiver_slots"] = self.receiver_slots()
        free = self.disk.free_bytes()
        watermark = self.disk.min_free_bytes
        detail = f"{free // 2**20} MB free, watermark {watermark // 2**20} MB"
        checks["disk"] = Check(free >= watermark,
                               detail + ("" if free >= watermark else ": C-STORE answers 0xA700"))
        return checks


def all_ok(checks: dict[str, Check]) -> bool:
    return all(c.ok for c in checks.values())

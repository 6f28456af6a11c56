"""More receiver processes on the one DICOM port (``receiver.processes``).

pynetdicom runs each association in Python threads of one process, so one process receives at
most one core's worth. With ``receiver.processes = N``, ``serve`` runs its own receiver and
``N - 1`` child processes (``opacityd receive``, internal), all listening with SO_REUSEPORT on
``receiver.port``; Linux hands each new connection to one of them. Each child has its own
database engine and writes the same spool and database; the durability rules are the same in
every process (an instance is acknowledged only after its file is fsynced and its row
committed). A child that dies (kill -9 included) loses nothing acknowledged: its incoming
folder is removed and it is restarted after ``RESTART_DELAY_S``; a sender whose association it
cut retries. Children get SIGTERM when ``serve`` dies (PR_SET_PDEATHSIG).

Limits (``max_associations``, per-address and pending connections) apply per process. The
receive counters on /metrics are those of serve's own receiver; the queue gauges, read from
the database, count every process's instances.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import structlog

from daemon.children import start_child
from daemon.config import Config
from daemon.dicom.incoming import remove_stale
from daemon.dicom.receiver import Receiver
from daemon.disk import DiskGuard
from daemon.exceptions import SpoolError
from daemon.spool import Spool
from db.engine import check_reachable, create_db_engine, make_session_factory

log = structlog.get_logger("opacityd.receivers")

RESTART_DELAY_S = 1.0


def run_receiver(config: Config) -> int:
    """`opacityd receive`: one receiver process of ``serve``, until SIGTERM."""
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    engine = create_db_engine(config.database_url, config.database.busy_timeout_ms)
    check_reachable(engine)  # raises DatabaseUnreachable: cli.main says so and exits 2
    spool = Spool(config.spool_dir)
    receiver = Receiver(config, make_session_factory(engine), spool,
                        DiskGuard(config.spool_dir, config.receiver.min_free_disk_mb))
    try:
        receiver.start()
    except (OSError, SpoolError) as e:
        log.error("listen_failed", dicom_port=config.receiver.port, error=str(e))
        engine.dispose()
        return 1
    marker = listening_marker(config, os.getpid())
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    stop.wait()
    receiver.stop(config.receiver.shutdown_grace_s)
    marker.unlink(missing_ok=True)
    engine.dispose()
    return 0


def listening_marker(config: Config, pid: int) -> Path:
    """Written by a receiver process once it listens; serve reads it for READY and /readyz."""
    return config.state_dir / "run" / f"receiver-{pid}.listening"


class ReceiverProcesses:
    """``count`` child receiver processes, restarted when one dies."""

    def __init__(self, config: Config, count: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * count
        self.restart_at: list[float | None] = [None] * count
        self.restarts = 0
        run_dir = config.state_dir / "run"
        for stale in run_dir.glob("receiver-*.listening") if run_dir.is_dir() else ():
            stale.unlink(missing_ok=True)  # of receivers killed with an earlier serve
        for slot in range(count):
            self._start(slot)

    def _start(self, slot: int) -> None:
        self.restart_at[slot] = None
        try:
            proc = start_child(self.config, "receive", {})
        except OSError as e:
            log.error("receiver_process_not_started", error=type(e).__name__)
            self.restart_at[slot] = self.clock() + RESTART_DELAY_S
            return
        self.procs[slot] = proc
        log.info("receiver_process_started", pid=proc.pid, slot=slot + 1)

    def check(self) -> None:
        """Called every tick: notice a dead child and restart it after ``RESTART_DELAY_S``."""
        for slot, proc in enumerate(self.procs):
            if proc is not None and (code := proc.poll()) is not None:
                self.procs[slot] = None
                listening_marker(self.config, proc.pid).unlink(missing_ok=True)
                files = remove_stale(self.config.spool_dir, proc.pid)
                log.error("receiver_process_exited", pid=proc.pid, code=code,
                          incoming_files_removed=files)
                self.restart_at[slot] = self.clock() + RESTART_DELAY_S
            restart = self.restart_at[slot]
            if self.procs[slot] is None and restart is not None and self.clock() >= restart:
                self.restarts += 1
                self._start(slot)

    def listening(self) -> bool:
        """Whether every child runs and listens (its :func:`listening_marker` is there)."""
        return all(p is not None and p.poll() is None
                   and listening_marker(self.config, p.pid).exists() for p in self.procs)

    def terminate(self) -> None:
        """SIGTERM every child: each stops accepting and drains, as serve's receiver does."""
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.terminate()

    def wait(self, grace_s: float) -> None:
        """Wait for the children to drain; SIGKILL those still running after the grace."""
        deadline = self.clock() + grace_s + 5
        for proc in self.procs:
            if proc is None:
                continue
            try:
                proc.wait(timeout=max(0.1, deadline - self.clock()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stop(self, grace_s: float) -> None:
        self.terminate()
        self.wait(grace_s)

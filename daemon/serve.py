"""`opacityd serve`: the receiver and the scheduler in one process, with a graceful stop.

First SIGTERM (or SIGINT): stop accepting associations, let in-flight ones
finish within ``receiver.shutdown_grace_s``, stop the scheduler, exit 0.
A second signal exits at once; nothing acknowledged is lost because an
acknowledgement is only sent after the commit.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import FrameType

import structlog

from daemon.config import Config
from daemon.output import emit
from daemon.receiver import Receiver
from daemon.scheduler import build_scheduler
from daemon.spool import Spool
from db import migrate
from db.engine import create_db_engine, make_session_factory
from model.errors import BundleError
from model.manifest import Manifest, read_manifest

log = structlog.get_logger("opacityd.serve")

EXIT_IMMEDIATE = 130
EXIT_NO_MODEL = 2
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child: get SIGTERM when `serve` dies, even by kill -9 (Linux prctl)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: the orphaned worker is harmless, claims are leased


class WorkerSupervisor:
    """Runs `opacityd worker` as a child process and restarts it when it dies."""

    def __init__(self, config: Config) -> None:
        self.argv = [sys.executable, "-m", "daemon.cli"]
        if config.source != "<embedded defaults>":
            self.argv += ["--config", config.source]
        self.argv.append("worker")
        self.env = {**os.environ, "OPACITYD_STATE_DIR": str(config.state_dir),
                    "OPACITYD_MODEL": config.model.bundle}
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._start()

    def _start(self) -> None:
        self.proc = subprocess.Popen(self.argv, env=self.env, preexec_fn=_die_with_parent)
        log.info("worker_process_started", pid=self.proc.pid, restarts=self.restarts)

    def check(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            log.error("worker_process_exited", code=self.proc.returncode, restarting=True)
            self.restarts += 1
            self._start()

    def stop(self, grace_s: float) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def check_model(config: Config) -> Manifest:
    """The configured bundle's manifest, checksum verified; raises :class:`BundleError`.

    The receiver never runs the model, so it checks the bundle without
    loading Keras; the worker loads it.
    """
    if not config.model.bundle:
        raise BundleError(
            "no model bundle configured: set model.bundle in the config file or "
            "OPACITYD_MODEL. To try the daemon with an UNTRAINED demo network: "
            "opacityd model init-demo state/demo-bundle && "
            "OPACITYD_MODEL=state/demo-bundle opacityd serve")
    return read_manifest(Path(config.model.bundle))


def serve(config: Config) -> int:
    """Run until signalled; returns the process exit code."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if stop.is_set():
            log.warning("second_signal_exit_now", signal=signal.Signals(signum).name)
            os._exit(EXIT_IMMEDIATE)
        log.info("shutdown_requested", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    try:
        manifest = check_model(config)
    except BundleError as e:
        log.error("model_bundle_unusable", error=str(e))
        emit(f"opacityd: {e}", error=True)
        return EXIT_NO_MODEL
    log.info("model_bundle", model=manifest.name, version=manifest.version,
             validated=manifest.validated, input_size=manifest.input_size,
             label=manifest.label)
    config.spool_dir.mkdir(parents=True, exist_ok=True)
    engine = create_db_engine(config.database_url, config.database.busy_timeout_ms)
    before, after = migrate.upgrade(engine)
    if before != after:
        log.info("database_migrated", from_revision=before, to_revision=after)
    sessions = make_session_factory(engine)
    spool = Spool(config.spool_dir)
    removed = spool.remove_temp_files()
    if removed:
        log.warning("spool_temp_files_removed", count=removed)

    receiver = Receiver(config, sessions, spool)
    scheduler = build_scheduler(config, sessions, spool)
    scheduler.start()
    worker = WorkerSupervisor(config) if config.worker.embedded else None
    try:
        receiver.start()
    except OSError as e:
        log.error("receiver_start_failed", port=config.receiver.port, error=str(e))
        scheduler.shutdown(wait=True)
        engine.dispose()
        return 1
    log.info("serving", config=config.source, state_dir=str(config.state_dir),
             database=engine.url.render_as_string(hide_password=True))
    while not stop.wait(1.0):
        if worker is not None:
            worker.check()
    receiver.stop(config.receiver.shutdown_grace_s)
    if worker is not None:
        worker.stop(config.receiver.shutdown_grace_s)
    scheduler.shutdown(wait=True)
    engine.dispose()
    log.info("stopped")
    return 0

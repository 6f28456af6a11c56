"""`opacityd serve`: the receiver, the scheduler, the HTTP interface and a supervised worker in
one process, with systemd notification and a graceful stop.

Under systemd (Type=notify): READY=1 once the SCP listens and the worker has loaded the model;
WATCHDOG=1 every half WatchdogSec while the database, scheduler and receiver are healthy (a
hung or broken service is then restarted by systemd); STOPPING=1 on the first signal.

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
import time
from pathlib import Path
from types import FrameType

import structlog

from daemon.config import Config
from daemon.disk import DiskGuard
from daemon.health import Check, Health, all_ok, ready_marker
from daemon.http_api import HttpApi
from daemon.metrics import Metrics
from daemon.output import emit
from daemon.receiver import Receiver
from daemon.report import with_threshold_overrides
from daemon.scheduler import build_scheduler
from daemon.spool import Spool
from daemon.systemd import notify, watchdog_interval_s
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
        self.config = config
        run_dir = config.state_dir / "run"
        for stale in run_dir.glob("worker-*.ready") if run_dir.is_dir() else ():
            stale.unlink(missing_ok=True)
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

    def model_loaded(self) -> Check:
        if self.proc is None or self.proc.poll() is not None:
            return Check(False, "worker process not running (restarting)")
        if not ready_marker(self.config, self.proc.pid).exists():
            return Check(False, f"worker {self.proc.pid} is loading the model")
        return Check(True, f"worker {self.proc.pid} has the model loaded")

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


def _run_until_stopped(stop: threading.Event, worker: WorkerSupervisor | None, health: Health) -> None:
    """Supervise the worker; tell systemd READY once the model is loaded, then ping the watchdog
    while the service is alive (and stop pinging when it is not)."""
    interval = watchdog_interval_s()
    tick = min(1.0, interval) if interval else 1.0
    ready = False
    last_ping = 0.0
    while not stop.wait(tick):
        if worker is not None:
            worker.check()
        if not ready:
            model = health.model_loaded()
            if model.ok:
                ready = True
                notify("READY=1\nSTATUS=serving")
                log.info("ready", model=model.detail)
        if interval and time.monotonic() - last_ping >= interval:
            checks = health.liveness()
            if all_ok(checks):
                notify("WATCHDOG=1")
                last_ping = time.monotonic()
            else:
                failed = {name: c.detail for name, c in checks.items() if not c.ok}
                log.error("watchdog_withheld", failed=failed)
                notify(f"STATUS=unhealthy: {', '.join(failed)}")


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
        manifest = with_threshold_overrides(check_model(config), config.model)
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

    disk = DiskGuard(config.spool_dir, config.receiver.min_free_disk_mb)
    metrics = Metrics(sessions, manifest, disk)
    receiver = Receiver(config, sessions, spool, disk, metrics)
    scheduler = build_scheduler(config, sessions, spool)
    scheduler.start()
    worker = WorkerSupervisor(config) if config.worker.embedded else None
    health = Health(sessions, disk, lambda: bool(scheduler.running), lambda: receiver.server is not None,
                    worker.model_loaded if worker is not None
                    else lambda: Check(True, "separate worker services; bundle manifest valid"))
    http = HttpApi(config, sessions, health, metrics) if config.http.enabled else None
    try:
        receiver.start()
        if http is not None:
            http.start()
    except OSError as e:
        log.error("listen_failed", dicom_port=config.receiver.port, http_port=config.http.port, error=str(e))
        receiver.stop(0)
        if worker is not None:
            worker.stop(config.receiver.shutdown_grace_s)
        scheduler.shutdown(wait=True)
        engine.dispose()
        return 1
    log.info("serving", config=config.source, state_dir=str(config.state_dir),
             database=engine.url.render_as_string(hide_password=True),
             http_port=http.port if http is not None else None)
    _run_until_stopped(stop, worker, health)
    notify("STOPPING=1")
    if http is not None:
        http.stop()
    receiver.stop(config.receiver.shutdown_grace_s)
    if worker is not None:
        worker.stop(config.receiver.shutdown_grace_s)
    scheduler.shutdown(wait=True)
    engine.dispose()
    log.info("stopped")
    return 0

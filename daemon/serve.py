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

import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from daemon.children import start_child
from daemon.config import Config
from daemon.dicom.incoming import remove_stale
from daemon.dicom.receiver import Receiver
from daemon.dicom.transport import slots_check
from daemon.disk import DiskGuard
from daemon.exceptions import SpoolError
from daemon.output import emit
from daemon.receivers import ReceiverProcesses
from daemon.results.report import with_threshold_overrides
from daemon.scheduler import build_scheduler
from daemon.spool import Spool
from daemon.systemd import notify, watchdog_interval_s
from daemon.web.health import Check, Health, all_ok, ready_marker
from daemon.web.http_api import HttpApi
from daemon.web.metrics import Metrics
from db import jobs, migrate
from db.engine import check_reachable, create_db_engine, display_url, make_session_factory, unit_of_work
from model.errors import BundleError
from model.manifest import Manifest, read_manifest

log = structlog.get_logger("opacityd.serve")

EXIT_IMMEDIATE = 130
EXIT_NO_MODEL = 2

def exit_status(code: int) -> str:
    """A child's exit as an operator reads it: ``exit 1`` or the signal's name (``SIGKILL``)."""
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"exit {code}"


class WorkerSupervisor:
    """Runs `opacityd worker` as a child process and restarts it when it dies.

    A dead worker's jobs go back to the queue at once (its leases are released, the attempt
    stays counted), and it is restarted after a capped exponential backoff
    (``config.worker.restart``): each death within ``worker.restart_max_s`` of its start
    doubles the wait; a worker that stayed up that long starts the count afresh.
    ``health`` (in /readyz) and ``opacityd_worker_restarts_total`` /
    ``opacityd_worker_quick_deaths`` show a worker that keeps dying.
    """

    KEEPS_DYING = 3
    """Quick deaths in a row from which /readyz reports the worker as failing."""

    def __init__(self, config: Config, sessions: sessionmaker[Session] | None = None,
                 registry: CollectorRegistry | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.sessions = sessions
        self.clock = clock
        run_dir = config.state_dir / "run"
        for stale in run_dir.glob("worker-*.ready") if run_dir.is_dir() else ():
            stale.unlink(missing_ok=True)
        self.policy = config.worker.restart
        self.stable_s = config.worker.restart_max_s
        self.host = socket.gethostname()
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.restart_at: float | None = None
        self.restarts = 0
        self.quick_deaths = 0
        self.last_exit: str | None = None
        self._restarts_metric = Counter(
            "opacityd_worker_restarts", "Worker processes restarted by serve after they died",
            registry=registry) if registry is not None else None
        self._quick_deaths_metric = Gauge(
            "opacityd_worker_quick_deaths", "Deaths in a row of the worker, each soon after its "
            "start (0 once a worker stays up)", registry=registry) if registry is not None else None
        self._start()

    def _start(self) -> None:
        self.started_at = self.clock()
        try:
            self.proc = start_child(self.config, "worker", {"OPACITYD_MODEL": self.config.model.bundle})
        except OSError as e:
            self.proc = None
            self._schedule_restart(f"not started: {type(e).__name__}")
            return
        log.info("worker_process_started", pid=self.proc.pid, restarts=self.restarts,
                 quick_deaths=self.quick_deaths)

    def model_loaded(self) -> Check:
        if self.proc is None or self.proc.poll() is not None:
            wait = "" if self.restart_at is None else \
                f" in {max(0.0, self.restart_at - self.clock()):.1f} s"
            return Check(False, f"worker process not running (last exit {self.last_exit}; "
                                f"restarting{wait})")
        if not ready_marker(self.config, self.proc.pid).exists():
            return Check(False, f"worker {self.proc.pid} is loading the model")
        return Check(True, f"worker {self.proc.pid} has the model loaded")

    def health(self) -> Check:
        """Failing while the worker keeps dying soon after each start."""
        detail = (f"{self.restarts} restarts; {self.quick_deaths} quick deaths in a row"
                  + (f"; last exit {self.last_exit}" if self.last_exit else ""))
        if self.quick_deaths >= self.KEEPS_DYING:
            return Check(False, f"worker keeps dying: {detail}")
        return Check(True, detail)

    def check(self) -> None:
        """Called every tick: notice a dead worker (release its jobs, schedule the restart),
        restart it when its backoff is over, and forget quick deaths once one stays up."""
        if self.proc is not None:
            code = self.proc.poll()
            if code is None:
                if self.quick_deaths and self.clock() - self.started_at >= self.stable_s:
                    log.info("worker_process_stable", pid=self.proc.pid,
                             quick_deaths_before=self.quick_deaths)
                    self._set_quick_deaths(0)
                return
            self._on_exit(self.proc.pid, code)
        if self.restart_at is not None and self.clock() >= self.restart_at:
            self.restart_at = None
            self.restarts += 1
            if self._restarts_metric is not None:
                self._restarts_metric.inc()
            self._start()

    def _on_exit(self, pid: int, code: int) -> None:
        self.proc = None
        uptime = self.clock() - self.started_at
        self.last_exit = exit_status(code)
        ready_marker(self.config, pid).unlink(missing_ok=True)
        log.error("worker_process_exited", pid=pid, code=code, status=self.last_exit,
                  uptime_s=round(uptime, 1))
        self.release_leases(pid)
        if uptime >= self.stable_s:
            self._set_quick_deaths(0)
        self._schedule_restart(self.last_exit)

    def _schedule_restart(self, why: str) -> None:
        self._set_quick_deaths(self.quick_deaths + 1)
        delay = self.policy.delay_s(self.quick_deaths)
        self.restart_at = self.clock() + delay
        log.warning("worker_restart_scheduled", after=why, restart_in_s=round(delay, 2),
                    quick_deaths=self.quick_deaths, restarts=self.restarts)

    def _set_quick_deaths(self, value: int) -> None:
        self.quick_deaths = value
        if self._quick_deaths_metric is not None:
            self._quick_deaths_metric.set(value)

    def release_leases(self, pid: int) -> None:
        """Put the RUNNING jobs of the dead worker ``pid`` back in the queue (or end them
        ``abandoned`` on their last attempt). When the database does not answer, the leases
        simply expire and another claim retries them."""
        if self.sessions is None:
            return
        try:
            with unit_of_work(self.sessions) as session:
                requeued, abandoned = jobs.release_leases(
                    session, f"{self.host}:{pid}:", datetime.now(UTC),
                    self.config.worker.retry.max_attempts, actor="serve")
        except SQLAlchemyError as e:
            log.error("worker_leases_not_released", pid=pid, error=type(e).__name__)
            return
        if requeued:
            log.warning("worker_leases_released", pid=pid, jobs=requeued)
        for job in abandoned:
            log.critical("job_abandoned", study_uid=job.study_uid, job_id=job.job_id,
                         attempts=job.attempts, reason=jobs.FailureReason.ABANDONED.value, pid=pid)

    def stop(self, grace_s: float) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            self.release_leases(self.proc.pid)


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


def _run_until_stopped(stop: threading.Event, worker: WorkerSupervisor | None,
                       receivers: ReceiverProcesses | None, health: Health) -> None:
    """Supervise the worker and the receiver processes; tell systemd READY once the model is
    loaded, then ping the watchdog while the service is alive (and stop pinging when it is not)."""
    interval = watchdog_interval_s()
    tick = min(1.0, interval) if interval else 1.0
    ready = False
    last_ping = 0.0
    while not stop.wait(tick):
        if worker is not None:
            worker.check()
        if receivers is not None:
            receivers.check()
        if not ready:
            model = health.model_loaded()
            if model.ok and health.receiver_listening():
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
    check_reachable(engine)  # raises DatabaseUnreachable: cli.main says so and exits 2
    before, after = migrate.upgrade(engine)
    if before != after:
        log.info("database_migrated", from_revision=before, to_revision=after)
    sessions = make_session_factory(engine)
    spool = Spool(config.spool_dir)
    removed = spool.remove_temp_files() + remove_stale(config.spool_dir)
    if removed:
        log.warning("spool_temp_files_removed", count=removed)

    disk = DiskGuard(config.spool_dir, config.receiver.min_free_disk_mb)
    metrics = Metrics(sessions, manifest, disk)
    receiver = Receiver(config, sessions, spool, disk, metrics)
    scheduler = build_scheduler(config, sessions, spool)
    scheduler.start()
    worker = WorkerSupervisor(config, sessions, metrics.registry) if config.worker.embedded else None
    receivers: ReceiverProcesses | None = None

    def listening() -> bool:  # reads ``receivers`` as set below, once serve's receiver listens
        return receiver.server is not None and (receivers is None or receivers.listening())

    health = Health(sessions, disk, lambda: bool(scheduler.running), listening,
                    worker.model_loaded if worker is not None
                    else lambda: Check(True, "separate worker services; bundle manifest valid"),
                    worker=worker.health if worker is not None else None,
                    receiver_slots=lambda: slots_check(receiver.server))
    http = HttpApi(config, sessions, health, metrics) if config.http.enabled else None
    try:
        receiver.start()
        if config.receiver.processes > 1:
            receivers = ReceiverProcesses(config, config.receiver.processes - 1)
        if http is not None:
            http.start()
    except (OSError, SpoolError) as e:
        log.error("listen_failed", dicom_port=config.receiver.port, http_port=config.http.port, error=str(e))
        receiver.stop(0)
        if receivers is not None:
            receivers.stop(0)
        if worker is not None:
            worker.stop(config.receiver.shutdown_grace_s)
        scheduler.shutdown(wait=True)
        engine.dispose()
        return 1
    log.info("serving", config=config.source, state_dir=str(config.state_dir),
             database=display_url(engine),
             http_port=http.port if http is not None else None)
    _run_until_stopped(stop, worker, receivers, health)
    notify("STOPPING=1")
    if http is not None:
        http.stop()
    if receivers is not None:
        receivers.terminate()  # they drain while serve's own receiver does
    receiver.stop(config.receiver.shutdown_grace_s)
    if receivers is not None:
        receivers.wait(config.receiver.shutdown_grace_s)
    if worker is not None:
        worker.stop(config.receiver.shutdown_grace_s)
    scheduler.shutdown(wait=True)
    engine.dispose()
    log.info("stopped")
    return 0

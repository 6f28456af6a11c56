"""Shared test harness: real peers on loopback, a real SQLite file, real DICOM files."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from daemon.config import Config, load_config
from daemon.dicom.receiver import Receiver
from daemon.scheduler import build_scheduler
from daemon.spool import Spool
from db import migrate
from db.engine import create_db_engine, make_session_factory, unit_of_work

if TYPE_CHECKING:
    from tests.pg import PostgresCluster

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
DICOM_DIR = SHARED_DATA / "dicom"
STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
ECHOSCU = "/usr/bin/echoscu"
OPACITYD = str(Path(sys.executable).with_name("opacityd"))
# Debian's DCMTK leaves Nagle on unless told otherwise (40x slower on small files).
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def require(path: str) -> None:
    if not Path(path).exists():
        pytest.skip(f"{path} is not installed (apt-get install dcmtk dicom3tools orthanc)")


@pytest.fixture
def shared_dicom() -> Path:
    if not DICOM_DIR.is_dir():
        pytest.skip(f"real DICOM files not available at {DICOM_DIR}")
    return DICOM_DIR


_HANDED_OUT: set[int] = set()


def _ephemeral_floor() -> int:
    """The lowest port the kernel gives to outgoing connections (32768 by default)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A loopback port nobody listens on, below the kernel's ephemeral range and never handed
    out before in this process. A port taken from the ephemeral range (bind to 0) could be
    given meanwhile to one of the many client connections the tests make (storescu, psycopg),
    or twice in a row, and the daemon's listen then fails with EADDRINUSE (seen once in CI)."""
    rng = random.Random()
    low, high = 20000, _ephemeral_floor() - 1
    for _ in range(200):
        port = rng.randint(low, high)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError(f"no free loopback port found between {low} and {high}")


def wait_until(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05,
               what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def write_config(folder: Path, extra: str = "", *, port: int | None = None,
                 quiet_s: float = 0.5, grace_s: float = 5.0, log_level: str = "info",
                 bundle: Path | None = None, database_url: str = "",
                 state_dir: Path | None = None) -> Path:
    """A config file for one test: its own state folder (``folder/state`` unless ``state_dir``
    names one that several processes share), a free port, a short quiet period;
    ``database_url`` empty: SQLite in the state folder."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.toml"
    receiver_extra, rest = _split_receiver(extra)
    http = f"[http]\nport = {free_port()}\n"
    if "[http]\n" in rest:  # the test configures [http] itself: give it a free port there
        rest, http = rest.replace("[http]\n", http, 1), ""
    database = f'[database]\nurl = "{database_url}"\n' if database_url else ""
    if database and "[database]\n" in rest:  # the test configures [database] itself
        rest, database = rest.replace("[database]\n", database, 1), ""
    path.write_text(
        f'[paths]\nstate_dir = "{state_dir or folder / "state"}"\n'
        f'[receiver]\nport = {port or free_port()}\nshutdown_grace_s = {grace_s}\n{receiver_extra}\n'
        f'[scheduler]\nstudy_quiet_period_s = {quiet_s}\ncheck_interval_s = 0.1\n'
        f'[logging]\nformat = "json"\nlevel = "{log_level}"\n'
        f'[model]\nbundle = "{bundle or ""}"\n'
        f'{database}{http}{rest}\n'
    )
    return path


def _split_receiver(extra: str) -> tuple[str, str]:
    """Lines before the first table header go into [receiver]; the rest is appended."""
    lines = extra.strip().splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith("["):
            return "\n".join(lines[:i]), "\n".join(lines[i:])
    return "\n".join(lines), ""


@contextmanager
def mounted_tmpfs(mount: Path, size: str) -> Iterator[Path]:
    """A small tmpfs at ``mount`` (a full disk on demand); skips the test where mounting is not
    allowed (needs root or CAP_SYS_ADMIN)."""
    mount.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


class Pacs:
    """DCMTK storescp as a minimal PACS; can be stopped and started again."""

    def __init__(self, folder: Path, port: int, tls: tuple[list[str], list[str]] = ([], []),
                 options: tuple[str, ...] = ()) -> None:
        """``tls``: DCMTK TLS options for storescp and for the echoscu that waits for it;
        ``options``: other storescp options (e.g. ``+uf``: a new file for every receipt)."""
        require(STORESCP)
        self.folder, self.port, self.tls, self.options = folder, port, tls, options
        folder.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Pacs:
        self.proc = subprocess.Popen([STORESCP, "-aet", "PACS", *self.tls[0], *self.options,
                                      "-od", str(self.folder),
                                      str(self.port)],
                                     env=DCMTK_ENV, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_until(lambda: subprocess.run([ECHOSCU, *self.tls[1], "-aec", "PACS", "127.0.0.1",
                                           str(self.port)],
                                          env=DCMTK_ENV, capture_output=True).returncode == 0,
                   what="storescp to listen")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)

    def srs(self) -> list[Path]:
        return sorted(self.folder.glob("SR*"))

    def summaries(self) -> list[Path]:
        """The summary images received (storescp names a Secondary Capture SC.<uid>)."""
        return sorted(self.folder.glob("SC*"))


@pytest.fixture(scope="session")
def demo_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained demo bundle at Xception's smallest input size (keeps the suite fast)."""
    from model.bundle import init_demo_bundle

    bundle = tmp_path_factory.mktemp("bundle") / "demo"
    init_demo_bundle(bundle, input_size=71)
    return bundle


@dataclass
class Harness:
    config: Config
    engine: Engine
    sessions: sessionmaker[Session]
    spool: Spool
    receiver: Receiver

    @property
    def port(self) -> int:
        return self.receiver.port

    def query(self, fn: Callable[[Session], Any]) -> Any:
        with unit_of_work(self.sessions) as session:
            return fn(session)

    def store(self, *datasets: Any) -> None:
        """C-STORE ``datasets`` (DX For Presentation) on one pynetdicom association; each must
        succeed."""
        from pynetdicom import AE
        from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation  # type: ignore[attr-defined]

        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(DigitalXRayImageStorageForPresentation)
        assoc = ae.associate("127.0.0.1", self.port, ae_title="OPACITYD")
        try:
            for ds in datasets:
                assert assoc.send_c_store(ds).Status == 0
        finally:
            assoc.release()


@contextmanager
def running_receiver(folder: Path, extra: str = "", quiet_s: float = 0.5,
                     database_url: str = "") -> Iterator[Harness]:
    """An in-process receiver on a free loopback port with a migrated database (SQLite in
    ``folder`` unless ``database_url`` names another)."""
    config = load_config(write_config(folder, extra, quiet_s=quiet_s, database_url=database_url),
                         env={})
    engine = create_db_engine(config.database_url)
    migrate.upgrade(engine)
    sessions = make_session_factory(engine)
    spool = Spool(config.spool_dir)
    receiver = Receiver(config, sessions, spool)
    scheduler = build_scheduler(config, sessions)
    scheduler.start()
    receiver.start()
    try:
        yield Harness(config, engine, sessions, spool, receiver)
    finally:
        receiver.stop(2.0)
        scheduler.shutdown(wait=True)
        engine.dispose()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresCluster]:
    """The session's PostgreSQL 15 cluster (started on first use). A test that stops it
    must start it again; one that wants to break it takes :func:`own_pg_cluster`."""
    from tests.pg import PostgresCluster, available

    if not available():
        pytest.skip("PostgreSQL 15 is not installed (scripts/setup.sh installs it)")
    cluster = PostgresCluster().start()
    yield cluster
    cluster.destroy()


@pytest.fixture
def own_pg_cluster() -> Iterator[PostgresCluster]:
    """A cluster of this test's own, free to be stopped, killed and restarted."""
    from tests.pg import PostgresCluster, available

    if not available():
        pytest.skip("PostgreSQL 15 is not installed (scripts/setup.sh installs it)")
    cluster = PostgresCluster().start()
    yield cluster
    cluster.destroy()


ENGINES = ("sqlite", "postgresql")


@pytest.fixture(params=ENGINES)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database on each engine: a SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'opacityd.sqlite3'}"
    cluster: PostgresCluster = request.getfixturevalue("pg_cluster")
    return cluster.new_database()


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    with running_receiver(tmp_path) as h:
        yield h


_ACK = re.compile(r"Received Store Response \((?P<status>[^)]*)\)")


def storescu(port: int, files: list[Path], *args: str, aet: str = "MODALITY",
             aec: str = "OPACITYD", timeout: float = 120) -> tuple[subprocess.CompletedProcess[str],
                                                                   dict[Path, str]]:
    """Send ``files`` with DCMTK storescu; returns the process and each file's response text."""
    require(STORESCU)
    proc = subprocess.run(
        [STORESCU, "-v", "-aet", aet, "-aec", aec, *args, "127.0.0.1", str(port),
         *map(str, files)],
        capture_output=True, text=True, env=DCMTK_ENV, timeout=timeout,
    )
    return proc, parse_acks(proc.stdout + proc.stderr)


def log_events(text: str, name: str) -> list[dict[str, Any]]:
    """The JSON log events called ``name`` in a process's output ``text``."""
    return [event for line in text.splitlines() if line.startswith("{")
            and (event := json.loads(line)).get("event") == name]


def parse_acks(output: str) -> dict[Path, str]:
    """Map each file storescu sent to the status text of the response it received."""
    acks: dict[Path, str] = {}
    current: Path | None = None
    for line in output.splitlines():
        if "Sending file: " in line:
            current = Path(line.split("Sending file: ", 1)[1].strip())
        m = _ACK.search(line)
        if m and current is not None:
            acks[current] = m.group("status")
            current = None
    return acks


def echoscu(port: int, *args: str, aet: str = "ECHOSCU", aec: str = "OPACITYD"
            ) -> subprocess.CompletedProcess[str]:
    require(ECHOSCU)
    return subprocess.run([ECHOSCU, "-v", "-aet", aet, "-aec", aec, *args, "127.0.0.1", str(port)],
                          capture_output=True, text=True, env=DCMTK_ENV, timeout=30)


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    """`main()` configures logging globally; put it back so later tests write nowhere stale."""
    import logging

    import structlog

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)


# The `daemons` fixture lives beside DaemonProcess, which imports helpers from this module;
# imported last so those helpers exist when it loads.
from tests.daemon_process import daemons  # noqa: E402, F401
from tests.worker_process import db_of, workers  # noqa: E402, F401

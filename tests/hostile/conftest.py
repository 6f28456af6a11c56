"""Hostile-network harness: a real `opacityd serve`, raw attacking sockets, a legitimate DCMTK
sender timed while the attack runs, and serve's resident memory sampled throughout."""

from __future__ import annotations

import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import DCMTK_ENV, DICOM_DIR, ECHOSCU, STORESCU, require
from tests.daemon_process import DaemonProcess, start_daemon
from tests.test_tls import pki  # noqa: F401 - the TLS test's CA and certificates, a fixture

# Short bounds so each attack is over in seconds; the defaults are in config.toml.
HOSTILE_RECEIVER = """max_associations = 4
association_request_timeout_s = 2.0
pdu_read_timeout_s = 2.0
max_pending_connections = 16
max_connections_per_address = 4
max_dataset_size_mb = 16
slots_exhausted_unready_s = 1.0
[worker]
embedded = false
"""
LEGIT_BOUND_S = 5.0
"""A legitimate sender must be served within this while an attack runs."""
RSS_GROWTH_BOUND_KIB = 64 * 1024
"""serve's resident memory may grow by at most this much during an attack."""
CHEST_FILE = DICOM_DIR / "fodicom_CR-MONO1-10-chest.dcm"
HUGE = 0xFFFFFFF0
"""A PDU length of about 4 GiB."""


def pdu_header(pdu_type: int, length: int) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, length)


def attacker(port: int, host: int = 2) -> socket.socket:
    """A TCP connection to serve from 127.0.0.<host> (not the legitimate sender's address)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((f"127.0.0.{host}", 0))
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    return sock


def closed_by_peer(sock: socket.socket, within_s: float) -> bool:
    """True when the peer closes (EOF or reset) within ``within_s``, reading whatever it sends."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            if not sock.recv(65536):
                return True
        except TimeoutError:
            return False
        except OSError:
            return True
    return False


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


class RssWatch:
    """Samples a process's VmRSS every 20 ms from start to stop; keeps the peak."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.baseline = rss_kib(pid)
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_kib(self.pid))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak - self.baseline


def echo_seconds(port: int) -> float:
    """Time a DCMTK echoscu; fails the test if it is not answered."""
    require(ECHOSCU)
    started = time.monotonic()
    proc = subprocess.run([ECHOSCU, "-to", "10", "-ta", "10", "-aet", "LEGIT", "-aec", "OPACITYD",
                           "127.0.0.1", str(port)], capture_output=True, text=True,
                          env=DCMTK_ENV, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    elapsed = time.monotonic() - started
    print(f"[figures] echoscu answered in {elapsed:.3f} s")  # shown with pytest -s
    return elapsed


def store_seconds(port: int) -> float:
    """Time a DCMTK storescu of a real chest radiograph; fails the test unless it succeeds."""
    require(STORESCU)
    if not CHEST_FILE.exists():
        pytest.skip(f"{CHEST_FILE} is not available")
    started = time.monotonic()
    proc = subprocess.run([STORESCU, "-to", "10", "-ta", "10", "-aet", "LEGIT", "-aec",
                           "OPACITYD", "127.0.0.1", str(port), str(CHEST_FILE)],
                          capture_output=True, text=True, env=DCMTK_ENV, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    elapsed = time.monotonic() - started
    print(f"[figures] storescu stored in {elapsed:.3f} s")
    return elapsed


@dataclass
class Target:
    daemon: DaemonProcess
    config: Path

    @property
    def port(self) -> int:
        return self.daemon.port

    @property
    def pid(self) -> int:
        assert self.daemon.proc is not None
        return self.daemon.proc.pid

    @contextmanager
    def under_attack(self) -> Iterator[RssWatch]:
        """Watches memory while the body attacks; afterwards the daemon must still answer
        C-ECHO and must not have grown by more than RSS_GROWTH_BOUND_KIB."""
        watch = RssWatch(self.pid)
        try:
            yield watch
        finally:
            growth = watch.stop()
            print(f"[figures] serve RSS {watch.baseline // 1024} MiB, grew {growth} KiB")
        assert growth < RSS_GROWTH_BOUND_KIB, f"serve grew by {growth} KiB under attack"
        echo_seconds(self.port)


@pytest.fixture
def target(tmp_path: Path, daemons: list[DaemonProcess], demo_bundle: Path) -> Target:
    daemon, cfg = start_daemon(tmp_path, daemons, HOSTILE_RECEIVER, bundle=demo_bundle)
    return Target(daemon, cfg)

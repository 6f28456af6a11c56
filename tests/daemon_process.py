"""Run `opacityd serve` as a real subprocess for crash, signal and log tests."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import OPACITYD, echoscu, free_port, wait_until, write_config


class DaemonProcess:
    def __init__(self, config: Path, log: Path, port: int, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.env = env or {}
        self.log_path = log
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> DaemonProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [OPACITYD, "--config", str(self.config), "serve"],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
        )
        log.close()
        wait_until(self._answers_echo, timeout=60, interval=0.2, what="opacityd to answer C-ECHO")
        return self

    def _answers_echo(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"opacityd exited with {self.proc.returncode}:\n{self.output()}")
        return echoscu(self.port).returncode == 0

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def terminate(self, timeout: float = 60) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def ensure_stopped(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


@pytest.fixture
def daemons() -> Iterator[list[DaemonProcess]]:
    """Daemons a test started; any still running at the end are killed."""
    started: list[DaemonProcess] = []
    yield started
    for d in started:
        d.ensure_stopped()


def start_daemon(folder: Path, daemons: list[DaemonProcess], extra: str = "",
                 env: dict[str, str] | None = None, **config: object) -> tuple[DaemonProcess, Path]:
    """`opacityd serve` on a free port with its own config in ``folder``; returns it and the config."""
    port = free_port()
    cfg = write_config(folder / "d", extra, port=port, **config)  # type: ignore[arg-type]
    daemon = DaemonProcess(cfg, folder / "daemon.log", port, env).start()
    daemons.append(daemon)
    return daemon, cfg

"""Starting the processes `serve` supervises (a worker, more receivers) as children of it.

Each child runs ``opacityd <command>`` with serve's config file and state folder, and gets
SIGTERM when serve dies, even by kill -9 (Linux ``prctl(PR_SET_PDEATHSIG)``), so a child is
never left running without its supervisor.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys

from daemon.config import Config

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In the child: get SIGTERM when `serve` dies, even by kill -9 (Linux prctl)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: an orphaned child is harmless (claims are leased, receivers drain)


def start_child(config: Config, command: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """``opacityd [--config <serve's file>] <command>`` with ``env`` added to serve's
    environment. Raises OSError when it cannot be started."""
    argv = [sys.executable, "-m", "daemon.cli"]
    if config.source != "<embedded defaults>":
        argv += ["--config", config.source]
    argv.append(command)
    return subprocess.Popen(argv, env={**os.environ, "OPACITYD_STATE_DIR": str(config.state_dir),
                                       **env}, preexec_fn=die_with_parent)

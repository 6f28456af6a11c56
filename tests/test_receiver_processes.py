"""`receiver.processes = 2`: two receiver processes on one port, kill -9 of either loses nothing.

A child receiver is killed while it holds associations (found by the sockets it owns, since
the kernel picks the process), then `serve` itself is killed mid-stream. Every instance any
storescu saw acknowledged must be in the database and the spool, byte for byte, once; nothing
is left in transfer.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pydicom
import sqlalchemy as sa

from daemon.config import load_config
from daemon.spool import INCOMING
from db.engine import create_db_engine, make_session_factory, unit_of_work
from db.models import Instance
from tests.conftest import DCMTK_ENV, STORESCU, log_events, parse_acks, require, wait_until
from tests.daemon_process import DaemonProcess, start_daemon
from tests.factories import write_series


def _sockets_of(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def _established_on(port: int, pid: int) -> int:
    """How many established TCP connections to ``port`` the process ``pid`` holds."""
    inodes = _sockets_of(pid)
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == "01" and fields[9] in inodes:
                count += 1
    return count



def _storescu(port: int, files: list[Path]) -> subprocess.Popen[str]:
    return subprocess.Popen([STORESCU, "-v", "-aet", "MODALITY", "-aec", "OPACITYD", "127.0.0.1",
                             str(port), *map(str, files)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=DCMTK_ENV)


def test_kill_9_of_a_receiver_process_and_of_serve_loses_no_acknowledged_instance(
        tmp_path: Path, daemons: list[DaemonProcess], demo_bundle: Path) -> None:
    require(STORESCU)
    daemon, cfg = start_daemon(tmp_path, daemons, "processes = 2", quiet_s=1.0, bundle=demo_bundle)
    port = daemon.port
    wait_until(lambda: len(log_events(daemon.output(), "receiver_process_started")) == 1, timeout=30,
               what="serve to start its second receiver process")
    child = int(str(log_events(daemon.output(), "receiver_process_started")[0]["pid"]))
    wait_until(lambda: daemon.output().count('"event": "receiver_listening"') == 2, timeout=30,
               what="both receiver processes to listen")

    batches = [write_series(tmp_path / f"in{i}", 40, 256, 256, prefix=f"b{i}") for i in range(16)]
    streams: list[subprocess.Popen[str]] = []
    for files in batches:  # the kernel spreads connections: open them until the child holds one
        streams.append(_storescu(port, files))
        try:
            wait_until(lambda: _established_on(port, child) > 0, timeout=1.0,
                       what="a connection on the child receiver")
            break
        except AssertionError:
            continue
    assert _established_on(port, child) > 0, "no connection reached the child receiver"
    os.kill(child, 9)
    wait_until(lambda: len(log_events(daemon.output(), "receiver_process_started")) == 2, timeout=30,
               what="serve to restart the killed receiver process")
    exited = log_events(daemon.output(), "receiver_process_exited")
    assert [(e["pid"], e["code"]) for e in exited] == [(child, -9)]

    late = [write_series(tmp_path / f"late{i}", 150, 256, 256, prefix=f"l{i}") for i in range(2)]
    streams += [_storescu(port, files) for files in late]
    wait_until(lambda: daemon.output().count('"event": "instance_stored"') > 40 + 20, timeout=60,
               what="the late streams to be under way")
    daemon.kill9()
    outputs = [s.communicate(timeout=120)[0] for s in streams]

    acked = [path for out in outputs for path, status in parse_acks(out).items()
             if status == "Success"]
    sent = sum(len(f) for f in batches[:len(streams) - 2]) + sum(len(f) for f in late)
    assert 40 < len(acked) < sent, "the kills must land mid-stream"

    restarted = DaemonProcess(cfg, tmp_path / "daemon.log", port).start()
    daemons.append(restarted)
    config = load_config(cfg, env={})
    engine = create_db_engine(config.database_url)
    with unit_of_work(make_session_factory(engine)) as session:
        rows = list(session.scalars(sa.select(Instance)))
    engine.dispose()
    by_uid = {r.sop_instance_uid: r for r in rows}
    assert len(by_uid) == len(rows), "an instance was recorded twice"
    for path in acked:
        original = pydicom.dcmread(path)
        row = by_uid.get(original.SOPInstanceUID)
        assert row is not None and row.spool_path, f"acknowledged {path.name} has no row or file"
        stored = pydicom.dcmread(config.spool_dir / row.spool_path)
        assert stored.PixelData == original.PixelData
    assert not list(config.spool_dir.rglob("*.partial")), "files in transfer were left behind"
    assert not [p for p in (config.spool_dir / INCOMING).rglob("*") if p.is_file()]
    assert restarted.terminate() == 0

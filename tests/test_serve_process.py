"""`opacityd serve` as a process: kill -9 mid-stream, SIGTERM, and no patient data in logs."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pydicom
import sqlalchemy as sa

from daemon.config import load_config
from db.engine import create_db_engine, make_session_factory, unit_of_work
from db.models import AuditEvent, Instance, Job
from tests.conftest import (
    DCMTK_ENV,
    OPACITYD,
    STORESCU,
    parse_acks,
    require,
    storescu,
    wait_until,
)
from tests.daemon_process import DaemonProcess, start_daemon
from tests.factories import SENTINEL_PHI, make_dx, write_series


def _finish(scu: subprocess.Popen[str]) -> str:
    """The rest of storescu's output. Read through the same buffered pipe object:
    ``communicate(timeout=...)`` reads the raw descriptor and would drop buffered lines."""
    assert scu.stdout is not None
    rest = scu.stdout.read()
    scu.wait(timeout=60)
    return rest


def _stream_until(port: int, files: list[Path], acks_wanted: int
                  ) -> tuple[subprocess.Popen[str], list[str]]:
    """Start storescu on ``files`` and return once it has printed ``acks_wanted`` responses."""
    require(STORESCU)
    scu = subprocess.Popen(
        [STORESCU, "-v", "-aet", "MODALITY", "-aec", "OPACITYD", "127.0.0.1", str(port),
         *map(str, files)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=DCMTK_ENV, bufsize=1,
    )
    assert scu.stdout is not None
    lines: list[str] = []
    seen = 0
    for line in scu.stdout:
        lines.append(line)
        if "Received Store Response" in line:
            seen += 1
            if seen >= acks_wanted:
                break
    return scu, lines


def _db(config_path: Path):  # type: ignore[no-untyped-def]
    config = load_config(config_path, env={})
    engine = create_db_engine(config.database_url)
    return config, engine, make_session_factory(engine)


def test_kill_9_mid_stream_loses_no_acknowledged_instance(
        tmp_path: Path, daemons: list[DaemonProcess], demo_bundle: Path) -> None:
    daemon, cfg = start_daemon(tmp_path, daemons, quiet_s=1.0, bundle=demo_bundle)
    port = daemon.port
    files = write_series(tmp_path / "in", 300, 256, 256)

    scu, lines = _stream_until(port, files, acks_wanted=60)
    daemon.kill9()
    rest = _finish(scu)
    acks = parse_acks("".join(lines) + rest)
    acked = [path for path, status in acks.items() if status == "Success"]
    assert 60 <= len(acked) < len(files), "the kill must land mid-stream"

    config, engine, sessions = _db(cfg)
    leftover = config.spool_dir / "leftover" / f".x.dcm.{'0' * 32}.partial"
    leftover.parent.mkdir(parents=True, exist_ok=True)
    leftover.write_bytes(b"half a file")

    restarted = DaemonProcess(cfg, tmp_path / "daemon.log", port).start()
    daemons.append(restarted)
    with unit_of_work(sessions) as session:
        rows = {r.sop_instance_uid: r for r in session.scalars(sa.select(Instance))}
    for path in acked:
        original = pydicom.dcmread(path)
        row = rows.get(original.SOPInstanceUID)
        assert row is not None, f"acknowledged {path.name} has no row"
        stored = pydicom.dcmread(config.spool_dir / row.spool_path)
        assert stored.PixelData == original.PixelData
    assert not list(config.spool_dir.rglob("*.partial"))

    def one_job() -> bool:
        with unit_of_work(sessions) as session:
            return session.scalar(sa.select(sa.func.count()).select_from(Job)) == 1
    wait_until(one_job, timeout=30, what="the study to complete after restart")
    assert restarted.terminate() == 0
    engine.dispose()


def test_sigterm_lets_the_association_in_flight_finish_then_exits_0(
        tmp_path: Path, daemons: list[DaemonProcess], demo_bundle: Path) -> None:
    daemon, cfg = start_daemon(tmp_path, daemons, bundle=demo_bundle)
    port = daemon.port
    files = write_series(tmp_path / "in", 60, 128, 128)
    scu, lines = _stream_until(port, files, acks_wanted=5)
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGTERM)
    rest = _finish(scu)
    assert daemon.proc.wait(timeout=30) == 0
    acks = parse_acks("".join(lines) + rest)
    assert len(acks) == len(files) and set(acks.values()) == {"Success"}
    assert '"event": "stopped"' in daemon.output()
    # No new association is accepted once stopping began: the port is closed now.
    _, after = storescu(port, files[:1])
    assert after == {}


def test_second_sigterm_exits_at_once(tmp_path: Path, daemons: list[DaemonProcess],
                                      demo_bundle: Path) -> None:
    daemon, cfg = start_daemon(tmp_path, daemons, grace_s=60.0, bundle=demo_bundle)
    port = daemon.port
    files = write_series(tmp_path / "in", 400, 256, 256)
    scu, _ = _stream_until(port, files, acks_wanted=3)
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: "shutdown_requested" in daemon.output(), what="first signal handled")
    started = time.monotonic()
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=10) == 130
    assert time.monotonic() - started < 5
    scu.kill()
    scu.wait()


def test_patient_identifiers_never_appear_in_any_log_line(
        tmp_path: Path, daemons: list[DaemonProcess], demo_bundle: Path) -> None:
    daemon, cfg = start_daemon(tmp_path, daemons, log_level="debug", bundle=demo_bundle)
    port = daemon.port
    folder = tmp_path / "in"
    folder.mkdir()
    for i, extra in enumerate([{}, {"view": "LL"}, {"modality": "CT"}]):
        ds = make_dx(phi=SENTINEL_PHI, seed=i, **extra)  # type: ignore[arg-type]
        ds.save_as(folder / f"{i}.dcm", enforce_file_format=True)
    no_series = make_dx(phi=SENTINEL_PHI)
    del no_series.SeriesInstanceUID
    no_series.save_as(folder / "bad.dcm", enforce_file_format=True)
    _, acks = storescu(port, sorted(folder.glob("*.dcm")))
    assert acks.pop(folder / "bad.dcm") == "Error: CannotUnderstand"
    assert list(acks.values()) == ["Success"] * 3

    config, engine, sessions = _db(cfg)

    def closed() -> bool:
        with unit_of_work(sessions) as session:
            return session.scalar(sa.select(sa.func.count()).select_from(Job)) == 1
    wait_until(closed, what="study completion")
    cli = subprocess.run([OPACITYD, "--config", str(cfg), "studies"], capture_output=True,
                         text=True, timeout=60)
    assert daemon.terminate() == 0
    with unit_of_work(sessions) as session:
        audit_text = " ".join(f"{a.actor} {a.detail}" for a in session.scalars(sa.select(AuditEvent)))
    engine.dispose()

    output = daemon.output() + cli.stdout + cli.stderr + audit_text
    assert "instance_stored" in output and "instance_refused" in output
    needles = [*SENTINEL_PHI.values(), "SENTINELNAME", "QUOKKA", "1902-03-04"]
    leaked = [n for n in needles if n in output]
    assert leaked == []

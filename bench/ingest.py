"""Ingest benchmark: opacityd serve (durable) vs DCMTK storescp, pushed by DCMTK storescu.

    python -m bench.ingest [--small 200] [--large 50] [--repeat 2] [--workdir bench/out/ingest]

Pushes the same files (512x512 and 2500x2048 16-bit DX) over one association
and over 4 parallel ones, to (a) `storescp` writing to disk (no fsync) and
(b) `opacityd serve` (fsync + rename + dir fsync + one SQLite commit per
instance). Prints instances/s, MB/s and the opacityd/storescp ratio, and
checks that opacityd holds every acknowledged instance.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import DCMTK_ENV, ECHOSCU, OPACITYD, STORESCP, STORESCU, free_port, write_config
from tests.factories import write_series


@dataclass
class Run:
    receiver: str
    associations: int
    seconds: float
    files: int
    megabytes: float
    acked: int
    held: int | None

    @property
    def rate(self) -> float:
        return self.files / self.seconds

    @property
    def mbps(self) -> float:
        return self.megabytes / self.seconds


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_files(workdir: Path, small: int, large: int) -> list[Path]:
    folder = workdir / "input"
    marker = folder / f".done-{small}-{large}"
    if marker.exists():
        return sorted(folder.rglob("*.dcm"))
    shutil.rmtree(folder, ignore_errors=True)
    _progress(f"generating {small} x 512x512 and {large} x 2500x2048 16-bit DX files ...")
    files = write_series(folder / "small", small, 512, 512, prefix="s")
    files += write_series(folder / "large", large, 2500, 2048, prefix="l")
    marker.touch()
    return sorted(files)


def _wait_echo(port: int, aec: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{aec} receiver exited with {proc.returncode}")
        ok = subprocess.run([ECHOSCU, "-aec", aec, "127.0.0.1", str(port)], env=DCMTK_ENV,
                            capture_output=True).returncode == 0
        if ok:
            return
        time.sleep(0.2)
    raise RuntimeError(f"{aec} receiver did not answer C-ECHO")


def _push(port: int, aec: str, files: list[Path], associations: int) -> tuple[float, int]:
    chunks = [files[i::associations] for i in range(associations)]
    started = time.perf_counter()
    procs = [subprocess.Popen([STORESCU, "-v", "-aec", aec, "127.0.0.1", str(port),
                               *map(str, chunk)], env=DCMTK_ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for chunk in chunks]
    outputs = [p.communicate()[0] for p in procs]
    elapsed = time.perf_counter() - started
    acked = sum(out.count("Received Store Response (Success)") for out in outputs)
    return elapsed, acked


def _run_reference(name: str, argv: list[str], aec: str, port: int, files: list[Path],
                   associations: int, megabytes: float) -> Run:
    """Start a reference receiver, push the files to it, stop it."""
    proc = subprocess.Popen(argv, env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_echo(port, aec, proc)
        seconds, acked = _push(port, aec, files, associations)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return Run(name, associations, seconds, len(files), megabytes, acked, None)


def run_storescp(workdir: Path, files: list[Path], associations: int, megabytes: float) -> Run:
    out = workdir / "storescp"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    port = free_port()
    argv = [STORESCP, "-aet", "PACS", "-od", str(out), "--fork", str(port)]
    return _run_reference("storescp", argv, "PACS", port, files, associations, megabytes)


def run_null_scp(files: list[Path], associations: int, megabytes: float) -> Run:
    port = free_port()
    argv = [sys.executable, "-m", "bench.null_scp", str(port)]
    return _run_reference("pynetdicom-null", argv, "NULLSCP", port, files, associations, megabytes)


def run_opacityd(workdir: Path, files: list[Path], associations: int, megabytes: float) -> Run:
    folder = workdir / "opacityd"
    shutil.rmtree(folder, ignore_errors=True)
    port = free_port()
    bundle = workdir / "demo-bundle"
    if not (bundle / "manifest.json").exists():
        subprocess.run([OPACITYD, "model", "init-demo", str(bundle), "--input-size", "71"], check=True,
                       capture_output=True)
    cfg = write_config(folder, port=port, quiet_s=5.0, bundle=bundle)
    with (folder / "daemon.log").open("wb") as log:
        proc = subprocess.Popen([OPACITYD, "--config", str(cfg), "serve"], stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        _wait_echo(port, "OPACITYD", proc)
        seconds, acked = _push(port, "OPACITYD", files, associations)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    with sqlite3.connect(folder / "state" / "opacityd.sqlite3") as db:
        held = db.execute("SELECT count(*) FROM instances WHERE spool_path IS NOT NULL").fetchone()[0]
    return Run("opacityd", associations, seconds, len(files), megabytes, acked, held)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", type=int, default=200)
    p.add_argument("--large", type=int, default=50)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--workdir", type=Path, default=Path("bench/out/ingest"))
    args = p.parse_args(argv)
    for tool in (STORESCU, STORESCP, ECHOSCU):
        if not Path(tool).exists():
            print(f"{tool} missing: apt-get install dcmtk", file=sys.stderr)
            return 2
    args.workdir = args.workdir.resolve()
    files = make_files(args.workdir, args.small, args.large)
    megabytes = sum(f.stat().st_size for f in files) / 1e6
    _progress(f"{len(files)} files, {megabytes:.0f} MB; {os.cpu_count()} CPUs; {platform.platform()}")
    results: list[tuple[Run, Run, Run]] = []
    for associations in (1, 4):
        for i in range(args.repeat):
            _progress(f"[{associations} assoc, run {i + 1}/{args.repeat}] storescp ...")
            ref = run_storescp(args.workdir, files, associations, megabytes)
            _progress(f"[{associations} assoc, run {i + 1}/{args.repeat}] pynetdicom null SCP ...")
            floor = run_null_scp(files, associations, megabytes)
            _progress(f"[{associations} assoc, run {i + 1}/{args.repeat}] opacityd serve ...")
            ours = run_opacityd(args.workdir, files, associations, megabytes)
            results.append((ref, floor, ours))
    print(f"\ningest: {len(files)} files ({args.small} x 512x512, {args.large} x 2500x2048, 16-bit), "
          f"{megabytes:.0f} MB, pushed by DCMTK storescu")
    print(f"{'assoc':>5}  {'storescp f/s':>12} {'MB/s':>5}  {'pynetdicom-null f/s':>19}  "
          f"{'opacityd f/s':>12} {'MB/s':>5}  {'vs storescp':>11}  {'vs null':>7}  acked/held")
    lost = 0
    for ref, floor, ours in results:
        held = ours.held if ours.held is not None else -1
        lost += max(0, ours.acked - held)
        print(f"{ours.associations:>5}  {ref.rate:>12.1f} {ref.mbps:>5.0f}  {floor.rate:>19.1f}  "
              f"{ours.rate:>12.1f} {ours.mbps:>5.0f}  {ours.rate / ref.rate:>11.2f}  "
              f"{ours.rate / floor.rate:>7.2f}  {ours.acked}/{held}")
    print("storescp (--fork) writes without fsync; pynetdicom-null acknowledges and discards; "
          "opacityd fsyncs file and folder and commits a row before each success.")
    print(f"acknowledged but not held by opacityd: {lost}")
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())

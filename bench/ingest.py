"""Ingest benchmark: opacityd serve (durable) vs DCMTK storescp, pushed by DCMTK storescu.

    python -m bench.ingest [--small 200] [--large 50] [--repeat 2] [--workdir bench/out/ingest]
    python -m bench.ingest --database postgres [--receivers 1,2,4] ...

Pushes the same files (512x512 and 2500x2048 16-bit DX) over one association
and over 4 parallel ones, to (a) `storescp` writing to disk (no fsync), (b) a
pynetdicom SCP that discards, (c) Orthanc (Debian's, default durable storage)
and (d) `opacityd serve` (fsync + rename + dir fsync + one SQLite commit per
instance). Prints instances/s, MB/s and opacityd's ratio to each, checks that
opacityd holds every acknowledged instance, and ends with one JSON line.

With ``--database postgres`` (a throwaway PostgreSQL 15 cluster, as the tests start it), it
runs the same pushes into opacityd on PostgreSQL and on SQLite (ratio PostgreSQL/SQLite),
then pushes 4 parallel associations spread over 1, 2 and 4 `serve` processes sharing one
PostgreSQL database and one spool (instances/s and the scaling factor against one process).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

from model.durable import write_durably
from tests.conftest import DCMTK_ENV, ECHOSCU, OPACITYD, STORESCP, STORESCU, free_port, write_config
from tests.factories import write_series
from tests.pg import PostgresCluster, available


@dataclass
class Run:
    receiver: str
    associations: int
    seconds: float
    files: int
    megabytes: float
    acked: int
    held: int | None
    cpu_s: float | None = None
    """CPU seconds the receiver's processes (and their children) spent during the push."""

    @property
    def cpu_ms_per_file(self) -> float:
        return float("nan") if self.cpu_s is None else 1000 * self.cpu_s / self.files

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


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its live children (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()
        if stat.parent.name == str(pid) or fields[1] == str(pid):
            total += int(fields[11]) + int(fields[12])
    return total / tick


def _push(port: int | list[int], aec: str, files: list[Path], associations: int) -> tuple[float, int]:
    """``associations`` storescu processes at once, each with every n-th file; with several
    ``port``s, association i goes to port i modulo their number."""
    ports = port if isinstance(port, list) else [port]
    chunks = [files[i::associations] for i in range(associations)]
    started = time.perf_counter()
    procs = [subprocess.Popen([STORESCU, "-v", "-aec", aec, "127.0.0.1", str(ports[i % len(ports)]),
                               *map(str, chunk)], env=DCMTK_ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i, chunk in enumerate(chunks)]
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
        cpu = _cpu_seconds(proc.pid)
        seconds, acked = _push(port, aec, files, associations)
        cpu = _cpu_seconds(proc.pid) - cpu
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return Run(name, associations, seconds, len(files), megabytes, acked, None, cpu)


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


ORTHANC = "/usr/sbin/Orthanc"


def run_orthanc(workdir: Path, files: list[Path], associations: int, megabytes: float) -> Run:
    """Orthanc from Debian with its default (durable) storage: files and its SQLite index in a
    fresh folder, nothing turned off; a third reference beside storescp and the null SCP."""
    folder = workdir / "orthanc"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    port = free_port()
    config = {"Name": "bench", "StorageDirectory": str(folder / "storage"),
              "IndexDirectory": str(folder / "index"), "DicomAet": "ORTHANC", "DicomPort": port,
              "HttpPort": free_port(), "RemoteAccessAllowed": False, "Plugins": []}
    (folder / "orthanc.json").write_text(json.dumps(config))
    return _run_reference("orthanc", [ORTHANC, str(folder / "orthanc.json")], "ORTHANC", port, files,
                          associations, megabytes)


def _demo_bundle(workdir: Path) -> Path:
    bundle = workdir / "demo-bundle"
    if not (bundle / "manifest.json").exists():
        subprocess.run([OPACITYD, "model", "init-demo", str(bundle), "--input-size", "71"], check=True,
                       capture_output=True)
    return bundle


def run_fsync_floor(workdir: Path, files: list[Path], associations: int, megabytes: float) -> Run:
    """No network, no database: ``associations`` threads each copy their share of the files
    (read, write a new file, fsync it, rename, fsync the folder). What this disk allows for
    storage that survives a power cut, the part of opacityd's promise storescp skips."""
    out = workdir / "fsync-floor"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)

    def copy(chunk: list[Path]) -> int:
        for path in chunk:
            write_durably(out / f"{path.parent.name}-{path.name}",
                          functools.partial(Path.write_bytes, data=path.read_bytes()))
        return len(chunk)

    chunks = [files[i::associations] for i in range(associations)]
    started = time.perf_counter()
    with ThreadPoolExecutor(associations) as pool:
        done = sum(pool.map(copy, chunks))
    return Run("fsync-floor", associations, time.perf_counter() - started, len(files), megabytes,
               done, None)


def run_opacityd(workdir: Path, files: list[Path], associations: int, megabytes: float,
                 database_url: str = "", processes: int = 1, receiver_processes: int = 1) -> Run:
    """``processes`` `serve` processes (embedded worker off, so that only receiving is
    measured) sharing one state folder and the database at ``database_url``
    (empty: SQLite in the state folder); each with ``receiver.processes = receiver_processes``."""
    folder = workdir / "opacityd"
    shutil.rmtree(folder, ignore_errors=True)
    bundle = _demo_bundle(workdir)
    ports = [free_port() for _ in range(processes)]
    # Receiving only: no worker loading the model or scoring studies beside the receiver.
    extra = f"processes = {receiver_processes}\n[worker]\nembedded = false\n"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i, port in enumerate(ports):
            cfg = write_config(folder / f"serve{i}", extra, port=port, quiet_s=5.0, bundle=bundle,
                               database_url=database_url, state_dir=folder / "state")
            with (folder / f"serve{i}.log").open("wb") as log:
                procs.append(subprocess.Popen([OPACITYD, "--config", str(cfg), "serve"], stdout=log,
                                              stderr=subprocess.STDOUT))
        for port, proc in zip(ports, procs, strict=True):
            _wait_echo(port, "OPACITYD", proc)
        for i in range(processes):  # every receiver process listens (not only the first)
            log_text = lambda i=i: (folder / f"serve{i}.log").read_text()  # noqa: E731
            deadline = time.monotonic() + 60
            while log_text().count('"event": "receiver_listening"') < receiver_processes:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"serve{i}: not all {receiver_processes} receivers listen")
                time.sleep(0.1)
        cpu = sum(_cpu_seconds(proc.pid) for proc in procs)
        seconds, acked = _push(ports, "OPACITYD", files, associations)
        cpu = sum(_cpu_seconds(proc.pid) for proc in procs) - cpu
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=60)
    held_sql = "SELECT count(*) FROM instances WHERE spool_path IS NOT NULL"
    if database_url:
        engine = sa.create_engine(database_url)
        with engine.connect() as conn:
            held = int(conn.exec_driver_sql(held_sql).scalar_one())
        engine.dispose()
    else:
        with sqlite3.connect(folder / "state" / "opacityd.sqlite3") as db:
            held = db.execute(held_sql).fetchone()[0]
    name = "opacityd" if processes == 1 else f"opacityd x{processes}"
    name += f" rp{receiver_processes}" if receiver_processes > 1 else ""
    return Run(name, associations, seconds, len(files), megabytes, acked, held, cpu)


def compare_engines(workdir: Path, files: list[Path], megabytes: float, repeat: int,
                    receivers: list[int]) -> tuple[int, dict[str, float]]:
    """PostgreSQL vs SQLite for one receiver, then 1..N receivers on PostgreSQL; returns
    (instances acknowledged but not held, headline figures)."""
    cluster = PostgresCluster().start()
    lost = 0
    try:
        rows: list[tuple[int, Run, Run]] = []
        for associations in (1, 4):
            for i in range(repeat):
                _progress(f"[{associations} assoc, run {i + 1}/{repeat}] opacityd on SQLite ...")
                lite = run_opacityd(workdir, files, associations, megabytes)
                _progress(f"[{associations} assoc, run {i + 1}/{repeat}] opacityd on PostgreSQL ...")
                pg = run_opacityd(workdir, files, associations, megabytes, cluster.new_database())
                rows.append((associations, lite, pg))
        scale: list[Run] = []
        for processes in receivers:
            for i in range(repeat):
                _progress(f"[{processes} receiver processes, 4 assoc, run {i + 1}/{repeat}] ...")
                scale.append(run_opacityd(workdir, files, 4, megabytes, cluster.new_database(),
                                          processes))
    finally:
        cluster.destroy()
    print(f"\ningest on PostgreSQL 15 vs SQLite: {len(files)} files, {megabytes:.0f} MB, one `serve`")
    print(f"{'assoc':>5}  {'SQLite f/s':>10}  {'PostgreSQL f/s':>14}  {'PG/SQLite':>9}  acked/held (PG)")
    ratios: dict[int, list[float]] = {}
    for associations, lite, pg in rows:
        ratios.setdefault(associations, []).append(pg.rate / lite.rate)
        for run in (lite, pg):
            lost += max(0, run.acked - (run.held or 0))
        print(f"{associations:>5}  {lite.rate:>10.1f}  {pg.rate:>14.1f}  {pg.rate / lite.rate:>9.2f}  "
              f"{pg.acked}/{pg.held}")
    print(f"\nreceiver processes on PostgreSQL, 4 parallel associations spread over them "
          f"(one database, one spool, {os.cpu_count()} CPUs)")
    print(f"{'processes':>9}  {'f/s':>7}  {'MB/s':>5}  {'vs 1 process':>12}  acked/held")
    best: dict[int, float] = {}
    for run in scale:
        processes = 1 if run.receiver == "opacityd" else int(run.receiver.rsplit("x", 1)[1])
        best[processes] = max(best.get(processes, 0.0), run.rate)
    base = best.get(1, float("nan"))
    for run in scale:
        processes = 1 if run.receiver == "opacityd" else int(run.receiver.rsplit("x", 1)[1])
        lost += max(0, run.acked - (run.held or 0))
        print(f"{processes:>9}  {run.rate:>7.1f}  {run.mbps:>5.0f}  {run.rate / base:>12.2f}  "
              f"{run.acked}/{run.held}")
    headline = {"pg_vs_sqlite_1_assoc": round(max(ratios.get(1, [float("nan")])), 3),
                "pg_vs_sqlite_4_assoc": round(max(ratios.get(4, [float("nan")])), 3),
                **{f"receivers_{n}_fps": round(rate, 1) for n, rate in best.items()},
                **{f"scaling_{n}_vs_1": round(rate / base, 3) for n, rate in best.items()}}
    return lost, headline


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", type=int, default=200)
    p.add_argument("--large", type=int, default=50)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--workdir", type=Path, default=Path("bench/out/ingest"))
    p.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite",
                   help="postgres: compare PostgreSQL with SQLite and scale receiver processes")
    p.add_argument("--receiver-processes", type=int, default=os.cpu_count() or 2,
                   help="receiver.processes of the second opacityd run (default: one per CPU)")
    p.add_argument("--receivers", default="1,2,4",
                   help="receiver process counts for --database postgres (comma-separated)")
    args = p.parse_args(argv)
    for tool in (STORESCU, STORESCP, ECHOSCU):
        if not Path(tool).exists():
            print(f"{tool} missing: apt-get install dcmtk", file=sys.stderr)
            return 2
    args.workdir = args.workdir.resolve()
    files = make_files(args.workdir, args.small, args.large)
    megabytes = sum(f.stat().st_size for f in files) / 1e6
    _progress(f"{len(files)} files, {megabytes:.0f} MB; {os.cpu_count()} CPUs; {platform.platform()}")
    if args.database == "postgres":
        if not available():
            print("PostgreSQL 15 missing: apt-get install postgresql", file=sys.stderr)
            return 2
        lost, headline = compare_engines(args.workdir, files, megabytes, args.repeat,
                                         [int(n) for n in args.receivers.split(",")])
        print(f"acknowledged but not held by opacityd: {lost}")
        print(json.dumps({"bench": "ingest", "database": "postgres", "files": len(files),
                          "lost": lost, **headline}))
        return 1 if lost else 0
    orthanc = Path(ORTHANC).exists()
    results: list[tuple[Run, Run, Run | None, Run, Run, Run]] = []
    for associations in (1, 4):
        for i in range(args.repeat):
            step = f"[{associations} assoc, run {i + 1}/{args.repeat}]"
            _progress(f"{step} storescp ...")
            ref = run_storescp(args.workdir, files, associations, megabytes)
            _progress(f"{step} pynetdicom null SCP ...")
            floor = run_null_scp(files, associations, megabytes)
            other = None
            if orthanc:
                _progress(f"{step} Orthanc ...")
                other = run_orthanc(args.workdir, files, associations, megabytes)
            _progress(f"{step} fsync floor (copy + fsync, no network) ...")
            durable = run_fsync_floor(args.workdir, files, associations, megabytes)
            _progress(f"{step} opacityd serve ...")
            ours = run_opacityd(args.workdir, files, associations, megabytes)
            _progress(f"{step} opacityd serve, receiver.processes = {args.receiver_processes} ...")
            multi = run_opacityd(args.workdir, files, associations, megabytes,
                                 receiver_processes=args.receiver_processes)
            results.append((ref, floor, other, durable, ours, multi))
    print(f"\ningest: {len(files)} files ({args.small} x 512x512, {args.large} x 2500x2048, 16-bit), "
          f"{megabytes:.0f} MB, pushed by DCMTK storescu")
    n = args.receiver_processes
    print(f"{'assoc':>5}  {'storescp f/s':>12} {'MB/s':>5}  {'null f/s':>8}  {'orthanc f/s':>11}  "
          f"{'fsync-floor f/s':>15}  {'opacityd f/s':>12} {'MB/s':>5}  {f'opacityd rp{n}':>13}  "
          f"{'vs storescp':>11}  {f'rp{n} vs storescp':>16}  {'vs null':>7}  {'vs orthanc':>10}  "
          f"{'vs fsync-floor':>14}  acked/held")
    lost = 0
    rows = []
    for ref, floor, other, durable, ours, multi in results:
        lost += sum(max(0, r.acked - (r.held if r.held is not None else -1)) for r in (ours, multi))
        best = max(ours, multi, key=lambda r: r.rate)
        vs_orthanc = best.rate / other.rate if other is not None else float("nan")
        print(f"{ours.associations:>5}  {ref.rate:>12.1f} {ref.mbps:>5.0f}  {floor.rate:>8.1f}  "
              f"{other.rate if other is not None else float('nan'):>11.1f}  {durable.rate:>15.1f}  "
              f"{ours.rate:>12.1f} {ours.mbps:>5.0f}  {multi.rate:>13.1f}  "
              f"{ours.rate / ref.rate:>11.2f}  {multi.rate / ref.rate:>16.2f}  "
              f"{best.rate / floor.rate:>7.2f}  {vs_orthanc:>10.2f}  {best.rate / durable.rate:>14.2f}  "
              f"{ours.acked}/{ours.held}, {multi.acked}/{multi.held}")
        rows.append({"associations": ours.associations, "storescp_fps": round(ref.rate, 1),
                     "null_fps": round(floor.rate, 1),
                     "orthanc_fps": round(other.rate, 1) if other is not None else None,
                     "fsync_floor_fps": round(durable.rate, 1),
                     "opacityd_fps": round(ours.rate, 1),
                     f"opacityd_rp{n}_fps": round(multi.rate, 1),
                     "vs_storescp": round(ours.rate / ref.rate, 3),
                     f"rp{n}_vs_storescp": round(multi.rate / ref.rate, 3),
                     "best_vs_orthanc": round(vs_orthanc, 3) if other is not None else None,
                     "best_vs_fsync_floor": round(best.rate / durable.rate, 3)})
    print(f"\nCPU ms per file (the receiver's processes, during the push; {os.cpu_count()} CPUs)")
    print(f"{'assoc':>5}  {'storescp':>8}  {'null':>6}  {'opacityd':>8}  {f'rp{n}':>6}")
    cpu_rows = []
    for ref, floor, _other, _durable, ours, multi in results:
        print(f"{ours.associations:>5}  {ref.cpu_ms_per_file:>8.2f}  {floor.cpu_ms_per_file:>6.2f}  "
              f"{ours.cpu_ms_per_file:>8.2f}  {multi.cpu_ms_per_file:>6.2f}")
        cpu_rows.append({"associations": ours.associations,
                         "storescp": round(ref.cpu_ms_per_file, 2),
                         "null": round(floor.cpu_ms_per_file, 2),
                         "opacityd": round(ours.cpu_ms_per_file, 2),
                         f"opacityd_rp{n}": round(multi.cpu_ms_per_file, 2)})
    print("storescp (--fork) writes without fsync; pynetdicom-null acknowledges and discards; "
          "Orthanc stores with its default (durable) settings; fsync-floor copies the files with "
          "fsync and no network; opacityd fsyncs file and folder and commits a row before each "
          f"success; rp{n}: receiver.processes = {n}. 'vs null/orthanc/fsync-floor' use the "
          "better opacityd run.")
    print(f"acknowledged but not held by opacityd: {lost}")
    print(json.dumps({"bench": "ingest", "database": "sqlite", "files": len(files), "lost": lost,
                      "runs": rows, "cpu_ms_per_file": cpu_rows}))
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())

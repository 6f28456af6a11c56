"""Soak: a steady stream from two senders for a long time, with PACS outages injected.

    python -m bench.soak [--minutes 30] [--rate 2.0] [--outage-every 300] [--outage-for 60]
                         [--input-size 299] [--workdir bench/out/soak]

Two sender threads each push single-image studies with DCMTK storescu (one association per
study) so that together they deliver ``--rate`` studies/s; `opacityd serve` (embedded worker)
scores them and sends SRs to a DCMTK storescp PACS, which is stopped for ``--outage-for`` s every
``--outage-every`` s. After the senders stop, the run drains for up to 10 minutes. Prints
received / scored / delivered / failed, receive-to-SR latency percentiles (all and during
outages), peak RSS of serve, its worker and the PACS, the database size, and whether every
acknowledged study got exactly one SR. Progress every 30 s on stderr.
"""

from __future__ import annotations

import argparse
import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pydicom

from bench.e2e import collect_srs, wait_for_worker
from tests.conftest import DCMTK_ENV, OPACITYD, STORESCU, Pacs, free_port, write_config
from tests.factories import make_dx


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--rate", type=float, default=2.0, help="studies/s, both senders together")
    p.add_argument("--outage-every", type=float, default=300.0)
    p.add_argument("--outage-for", type=float, default=60.0)
    p.add_argument("--input-size", type=int, default=299)
    p.add_argument("--workdir", type=Path, default=Path("bench/out/soak"))
    args = p.parse_args(argv)
    workdir = args.workdir.resolve()
    bundle = workdir / f"demo-bundle-{args.input_size}"
    if not (bundle / "manifest.json").exists():
        _progress(f"creating an untrained {args.input_size} px demo bundle ...")
        subprocess.run([OPACITYD, "model", "init-demo", str(bundle), "--input-size", str(args.input_size)],
                       check=True, capture_output=True)
    template = workdir / "template.dcm"
    workdir.mkdir(parents=True, exist_ok=True)
    if not template.exists():
        make_dx(512, 512, seed=1).save_as(template, enforce_file_format=True)
    run = workdir / f"run-{int(time.time())}"
    inputs, pacs_dir = run / "in", run / "pacs"
    inputs.mkdir(parents=True)
    pacs_dir.mkdir()
    pacs = Pacs(pacs_dir, free_port())
    pacs.start()
    port = free_port()
    extra = (f'[[destinations]]\nname = "pacs"\nhost = "127.0.0.1"\nport = {pacs.port}\ncalled_ae = "PACS"\n'
             '[delivery]\npoll_interval_s = 0.2\nretry_base_s = 2.0\nretry_max_s = 20.0\nmax_attempts = 30\n'
             '[worker]\npoll_interval_s = 0.1\nbatch_size = 8\n')
    cfg = write_config(run / "d", extra, port=port, quiet_s=1.0, bundle=bundle)
    log = (run / "daemon.log").open("wb")
    daemon = subprocess.Popen([OPACITYD, "--config", str(cfg), "serve"], stdout=log, stderr=subprocess.STDOUT)
    released: dict[str, float] = {}
    refused: list[str] = []
    arrived: dict[str, float] = {}
    seen: set[str] = set()
    outages: list[tuple[float, float]] = []
    peak = {"serve": 0.0, "worker": 0.0, "pacs": 0.0}
    lock = threading.Lock()
    stop = threading.Event()

    def sender(number: int, period: float, end: float) -> None:
        ds = pydicom.dcmread(template)
        tick = time.monotonic() + number * period / 2
        n = 0
        while tick < end and not stop.is_set():
            time.sleep(max(0.0, tick - time.monotonic()))
            ds.StudyInstanceUID = pydicom.uid.generate_uid()
            ds.SeriesInstanceUID = pydicom.uid.generate_uid()
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
            path = inputs / f"s{number}-{n:05d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            proc = subprocess.run([STORESCU, "-aet", f"MOD{number}", "-aec", "OPACITYD", "127.0.0.1",
                                   str(port), str(path)], env=DCMTK_ENV, capture_output=True, text=True)
            with lock:
                if proc.returncode == 0:
                    released[str(ds.StudyInstanceUID)] = time.monotonic()
                else:
                    refused.append(proc.stderr[-200:])
            path.unlink()
            n += 1
            tick += period

    def sample() -> None:
        peak["serve"] = max(peak["serve"], _rss_mb(daemon.pid))
        for child in _children(daemon.pid):
            peak["worker"] = max(peak["worker"], _rss_mb(child))
        if pacs.proc is not None:
            peak["pacs"] = max(peak["pacs"], _rss_mb(pacs.proc.pid))

    try:
        wait_for_worker(run / "daemon.log", daemon)
        started = time.monotonic()
        end = started + args.minutes * 60
        period = 2 / args.rate
        threads = [threading.Thread(target=sender, args=(i, period, end), daemon=True) for i in range(2)]
        for t in threads:
            t.start()
        next_outage = started + args.outage_every
        last_report = started
        while any(t.is_alive() for t in threads):
            now = time.monotonic()
            if now >= next_outage and now < end:
                _progress(f"[{(now - started) / 60:5.1f} min] PACS outage for {args.outage_for:.0f} s")
                pacs.stop()
                outages.append((now, now + args.outage_for))
                while time.monotonic() < now + args.outage_for:
                    sample()
                    collect_srs(pacs_dir, arrived, seen)
                    time.sleep(0.5)
                pacs.start()
                next_outage += args.outage_every
            sample()
            collect_srs(pacs_dir, arrived, seen)
            if now - last_report >= 30:
                last_report = now
                with lock:
                    sent = len(released)
                _progress(f"[{(now - started) / 60:5.1f} min] acknowledged {sent}, SRs at the PACS "
                          f"{len(arrived)}, serve {peak['serve']:.0f} MB, worker {peak['worker']:.0f} MB")
            time.sleep(0.5)
        sending_done = time.monotonic()
        _progress("senders finished; draining (up to 10 min) ...")
        while len(arrived) < len(released) and time.monotonic() < sending_done + 600:
            sample()
            collect_srs(pacs_dir, arrived, seen)
            time.sleep(0.5)
    finally:
        stop.set()
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=180)
        pacs.stop()
        log.close()

    database = run / "d" / "state" / "opacityd.sqlite3"
    with sqlite3.connect(database) as db:
        scored = db.execute("SELECT count(*) FROM results").fetchone()[0]
        by_state = dict(db.execute("SELECT state, count(*) FROM deliveries GROUP BY state").fetchall())
        failed_jobs = db.execute("SELECT count(*) FROM jobs WHERE state = 'failed'").fetchone()[0]
    db_bytes = sum(f.stat().st_size for f in database.parent.glob("opacityd.sqlite3*"))
    copies: dict[str, int] = {}
    for path in pacs_dir.glob("SR*"):
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
        copies[uid] = copies.get(uid, 0) + 1
    latencies = np.array([arrived[s] - released[s] for s in arrived if s in released])
    in_outage = np.array([arrived[s] - released[s] for s in arrived if s in released
                          and any(a <= released[s] < b for a, b in outages)])
    missing = [s for s in released if s not in copies]
    sends: dict[str, int] = {}
    for line in (run / "daemon.log").read_text().splitlines():
        if line.startswith("{") and '"sr_delivered"' in line:
            sr = json.loads(line)["sr"]
            sends[sr] = sends.get(sr, 0) + 1
    twice = [sr for sr, n in sends.items() if n > 1]
    print(f"\nsoak: {args.minutes:.0f} min at {args.rate} studies/s from 2 senders, {len(outages)} PACS "
          f"outages of {args.outage_for:.0f} s, {args.input_size} px untrained demo bundle")
    print(f"acknowledged {len(released)}, refused {len(refused)}, scored {scored}, delivered "
          f"{by_state.get('delivered', 0)}, delivery failed {by_state.get('failed', 0)}, "
          f"pending {by_state.get('pending', 0)}, jobs failed {failed_jobs}")
    print(f"SRs at the PACS: {len(copies)} studies; acknowledged without SR: {len(missing)}; "
          f"SRs sent more than once: {len(twice)}")
    for name, values in (("all", latencies), ("sent during an outage", in_outage)):
        if len(values):
            print(f"release -> SR at PACS ({name}, n={len(values)}): p50 {np.percentile(values, 50):.1f} s, "
                  f"p95 {np.percentile(values, 95):.1f} s, p99 {np.percentile(values, 99):.1f} s, "
                  f"max {values.max():.1f} s")
    print(f"peak RSS: serve {peak['serve']:.0f} MB, worker {peak['worker']:.0f} MB, "
          f"storescp {peak['pacs']:.0f} MB; database {db_bytes / 2**20:.1f} MB")
    print("nothing lost" if not missing else f"LOST: {len(missing)} acknowledged studies have no SR")
    return 0 if not missing else 1


if __name__ == "__main__":
    sys.exit(main())

"""Soak: a steady stream from two senders for a long time, with PACS outages injected.

    python -m bench.soak [--minutes 30] [--rate 2.0] [--outage-every 300] [--outage-for 60]
                         [--input-size 299] [--workdir bench/out/soak]
                         [--chaos] [--kill-every 60] [--seed 1]

Two sender threads each push single-image studies with DCMTK storescu (one association per
study) so that together they deliver ``--rate`` studies/s; `opacityd serve` (embedded worker)
scores them and sends SRs to a DCMTK storescp PACS, which is stopped for ``--outage-for`` s every
``--outage-every`` s. After the senders stop, the run drains for up to 10 minutes. Prints
received / scored / delivered / failed, receive-to-SR latency percentiles (all and during
outages), peak RSS of serve, its worker and the PACS, the database size, and whether every
acknowledged study got exactly one SR. Progress every 30 s on stderr.

``--chaos`` adds, on top of the outages, kill -9 of the worker process or of `serve` itself at
random moments (seeded: exponential gaps with mean ``--kill-every`` s; one kill in four hits
`serve`, which is then started again at once, as systemd's Restart= would). The PACS keeps a
file per receipt (storescp ``+uf``), so an SR that reached it twice is counted. It then reports
acknowledged / held / scored / delivered, studies with more than one distinct SR, SRs received
twice, and lost (acknowledged without its instance held, or without an SR or a recorded failure).
"""

from __future__ import annotations

import argparse
import json
import random
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


class Serve:
    """`opacityd serve` that a chaos run may kill and start again (log appended)."""

    def __init__(self, cfg: Path, log: Path) -> None:
        self.cfg, self.log = cfg, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> subprocess.Popen[bytes]:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([OPACITYD, "--config", str(self.cfg), "serve"], stdout=out,
                                         stderr=subprocess.STDOUT)
        self.starts += 1
        return self.proc

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


def _kill_something(rng: random.Random, serve: Serve) -> str:
    """kill -9 the worker (3 in 4) or serve (then start it again); returns what was killed."""
    workers = _children(serve.pid)
    if workers and rng.random() < 0.75:
        subprocess.run(["kill", "-9", str(workers[0])], check=False)
        return "worker"
    assert serve.proc is not None
    serve.proc.send_signal(signal.SIGKILL)
    serve.proc.wait(timeout=30)
    serve.start()
    return "serve"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--rate", type=float, default=2.0, help="studies/s, both senders together")
    p.add_argument("--outage-every", type=float, default=300.0)
    p.add_argument("--outage-for", type=float, default=60.0)
    p.add_argument("--input-size", type=int, default=299)
    p.add_argument("--workdir", type=Path, default=Path("bench/out/soak"))
    p.add_argument("--chaos", action="store_true", help="also kill -9 the worker and serve")
    p.add_argument("--kill-every", type=float, default=60.0, help="mean seconds between kills")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
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
    pacs = Pacs(pacs_dir, free_port(), options=("+uf",) if args.chaos else ())
    pacs.start()
    port = free_port()
    extra = (f'[[destinations]]\nname = "pacs"\nhost = "127.0.0.1"\nport = {pacs.port}\ncalled_ae = "PACS"\n'
             '[delivery]\npoll_interval_s = 0.2\nretry_base_s = 2.0\nretry_max_s = 20.0\nmax_attempts = 30\n'
             '[worker]\npoll_interval_s = 0.1\nbatch_size = 8\n')
    cfg = write_config(run / "d", extra, port=port, quiet_s=1.0, bundle=bundle)
    serve = Serve(cfg, run / "daemon.log")
    daemon = serve.start()
    kills: list[str] = []
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
        peak["serve"] = max(peak["serve"], _rss_mb(serve.pid))
        for child in _children(serve.pid):
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
        next_kill = started + rng.expovariate(1 / args.kill_every)
        last_report = started
        while any(t.is_alive() for t in threads):
            now = time.monotonic()
            if args.chaos and now >= next_kill and now < end:
                kills.append(_kill_something(rng, serve))
                _progress(f"[{(now - started) / 60:5.1f} min] kill -9 {kills[-1]}")
                next_kill = now + rng.expovariate(1 / args.kill_every)
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
                _progress(f"[{(now - started) / 60:5.1f} min] acknowledged {sent}, refused {len(refused)}, "
                          f"kills {len(kills)}, SRs at the PACS "
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
        assert serve.proc is not None
        serve.proc.send_signal(signal.SIGTERM)
        serve.proc.wait(timeout=180)
        pacs.stop()

    database = run / "d" / "state" / "opacityd.sqlite3"
    with sqlite3.connect(database) as db:
        scored = db.execute("SELECT count(*) FROM results").fetchone()[0]
        by_state = dict(db.execute("SELECT state, count(*) FROM deliveries GROUP BY state").fetchall())
        failed_jobs = db.execute("SELECT count(*) FROM jobs WHERE state = 'failed'").fetchone()[0]
        held_rows = db.execute("SELECT s.study_uid, i.spool_path FROM instances i "
                               "JOIN studies s ON s.id = i.study_id").fetchall()
        failed_studies = {row[0] for row in db.execute(
            "SELECT s.study_uid FROM jobs j JOIN studies s ON s.id = j.study_id "
            "WHERE j.state = 'failed'").fetchall()}
    spool = run / "d" / "state" / "spool"
    held = {uid for uid, rel in held_rows if rel and (spool / rel).is_file()}
    db_bytes = sum(f.stat().st_size for f in database.parent.glob("opacityd.sqlite3*"))
    copies: dict[str, int] = {}
    distinct: dict[str, set[str]] = {}
    receipts: dict[str, int] = {}
    for path in pacs_dir.glob("SR*"):
        sr_ds = pydicom.dcmread(path, stop_before_pixels=True)
        uid, sop = str(sr_ds.StudyInstanceUID), str(sr_ds.SOPInstanceUID)
        copies[uid] = copies.get(uid, 0) + 1
        distinct.setdefault(uid, set()).add(sop)
        receipts[sop] = receipts.get(sop, 0) + 1
    two_results = [uid for uid, sops in distinct.items() if len(sops) > 1]
    received_twice = [sop for sop, n in receipts.items() if n > 1]
    not_held = [s for s in released if s not in held]
    latencies = np.array([arrived[s] - released[s] for s in arrived if s in released])
    in_outage = np.array([arrived[s] - released[s] for s in arrived if s in released
                          and any(a <= released[s] < b for a, b in outages)])
    missing = [s for s in released if s not in copies and s not in failed_studies]
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
          f"SRs recorded as delivered more than once: {len(twice)}")
    if args.chaos:
        print(f"chaos (seed {args.seed}): {kills.count('worker')} worker kills, "
              f"{kills.count('serve')} serve kills")
        print(f"acknowledged {len(released)}, held {len(held)} (acknowledged and held "
              f"{len(released) - len(not_held)}), scored {scored}, delivered "
              f"{by_state.get('delivered', 0)}; studies with more than one distinct SR "
              f"{len(two_results)}; SRs received twice at the PACS {len(received_twice)}; "
              f"acknowledged but not held {len(not_held)}")
    for name, values in (("all", latencies), ("sent during an outage", in_outage)):
        if len(values):
            print(f"release -> SR at PACS ({name}, n={len(values)}): p50 {np.percentile(values, 50):.1f} s, "
                  f"p95 {np.percentile(values, 95):.1f} s, p99 {np.percentile(values, 99):.1f} s, "
                  f"max {values.max():.1f} s")
    print(f"peak RSS: serve {peak['serve']:.0f} MB, worker {peak['worker']:.0f} MB, "
          f"storescp {peak['pacs']:.0f} MB; database {db_bytes / 2**20:.1f} MB")
    lost = sorted(set(missing) | set(not_held))
    print("nothing lost" if not lost else f"LOST: {len(lost)} acknowledged studies are not held "
          f"or have neither an SR nor a recorded failure")
    print(json.dumps({
        "bench": "soak", "minutes": args.minutes, "rate": args.rate, "chaos": bool(args.chaos),
        "acknowledged": len(released), "refused": len(refused), "scored": scored,
        "deliveries": dict(by_state), "srs_at_pacs": len(copies),
        "worker_kills": kills.count("worker"), "serve_kills": kills.count("serve"),
        "studies_with_two_srs": len(two_results), "srs_received_twice": len(received_twice),
        "p50_s": round(float(np.percentile(latencies, 50)), 2) if len(latencies) else None,
        "p95_s": round(float(np.percentile(latencies, 95)), 2) if len(latencies) else None,
        "peak_rss_mb": {k: round(v) for k, v in peak.items()}, "lost": len(lost)}))
    return 0 if not lost and not two_results else 1


if __name__ == "__main__":
    sys.exit(main())

"""End-to-end benchmark: single-image studies in, SRs out at a DCMTK storescp PACS.

    python -m bench.e2e [--studies 100] [--quiet 1.0] [--bundle DIR] [--workdir bench/out/e2e]
                        [--summaries both|on|off] [--rate 0.5x,0.9x] [--config-extra TOML]
    python -m bench.e2e --workers 1,2,3 [--database postgres] ...

Pushes each study with its own DCMTK storescu association to `opacityd serve`
(quiet period 1 s, embedded worker, batch 8), and prints: time from
association release to the SR landing at the PACS (p50/p95/max), studies per
minute, and the worker's images/s as a ratio of the bare network on ready
tensors (same bundle, batch 8, measured in this script). By default it runs twice, with
summary images (Grad-CAM and the Secondary Capture) on and off, and prints what a summary
costs per study in worker time and in inferences. Each pass also prints where the CPU went,
in CPU seconds per study: the worker (preprocessing, settling: SRs, summaries, files and result
rows, and the rest: the network), `serve`, the PACS and the storescu clients, all on this host.

With ``--rate``, further passes push the studies at fixed arrival rates instead of as fast as
storescu goes: studies/s, or with an ``x`` suffix a fraction of the capacity the burst pass of the
same run measured (the worker's studies/s), e.g. ``--rate 0.5x,0.9x``. Each prints the latency
percentiles beside the goal (quiet period + 2 s + one batch at the bare network's rate).
``--config-extra`` adds TOML lines to the `serve` config's ``[worker]`` table (e.g.
``inference_threads = 1``).

With ``--workers 1,2,3``, `serve` runs without its embedded worker and each pass starts that
many `opacityd worker` processes on the same database (``--database postgres``: a throwaway
PostgreSQL 15 cluster, as the tests start it); it prints studies/min and the latency
percentiles per worker count, side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from tests.conftest import DCMTK_ENV, OPACITYD, STORESCP, STORESCU, free_port, write_config
from tests.factories import make_dx
from tests.pg import PostgresCluster


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _bare_network_rate(bundle: Path) -> float:
    from model.predictor import Predictor

    predictor = Predictor(bundle, warm_up_batch=8)
    size = predictor.manifest.input_size
    batch = np.random.default_rng(0).uniform(-1, 1, (8, size, size, 3)).astype(np.float32)
    started = time.perf_counter()
    for _ in range(6):
        predictor.predict(batch)
    return 48 / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--studies", type=int, default=100)
    p.add_argument("--quiet", type=float, default=1.0)
    p.add_argument("--bundle", type=Path)
    p.add_argument("--workdir", type=Path, default=Path("bench/out/e2e"))
    p.add_argument("--workers", help="comma-separated counts of separate worker processes, e.g. 1,2,3")
    p.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    p.add_argument("--summaries", choices=("both", "on", "off"), default="both",
                   help="embedded passes with summary images on and off (default both, side by side)")
    p.add_argument("--rate", default="",
                   help="comma-separated arrival rates for further passes: studies/s, or a fraction "
                        "of the measured capacity with an x suffix (0.5x,0.9x)")
    p.add_argument("--config-extra", default="",
                   help="TOML lines added to the [worker] table of serve's config")
    args = p.parse_args(argv)
    worker_extra = args.config_extra.replace("\\n", "\n")
    workdir = args.workdir.resolve()
    bundle = args.bundle or workdir / "demo-bundle-299"
    if not (bundle / "manifest.json").exists():
        _progress("creating an untrained 299 px demo bundle ...")
        subprocess.run([OPACITYD, "model", "init-demo", str(bundle)], check=True, capture_output=True)
    inputs = workdir / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(args.studies):
        path = inputs / f"{i:04d}.dcm"
        if not path.exists():
            make_dx(512, 512, seed=i).save_as(path, enforce_file_format=True)
        files.append(path)
    study_of = {pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID: f for f in files}
    if args.workers:
        return compare_workers(workdir, bundle, study_of, args.quiet,
                               [int(n) for n in args.workers.split(",")], args.database)

    modes = {"both": [True, False], "on": [True], "off": [False]}[args.summaries]
    passes = []
    for summaries in modes:
        _progress(f"pass with summary images {'on' if summaries else 'off'} ...")
        passes.append(embedded_pass(workdir, bundle, study_of, args.quiet, summaries,
                                    worker_extra=worker_extra))
    rate_passes: list[dict[str, Any]] = []
    for text in filter(None, args.rate.split(",")):
        for r in passes:
            rate = (float(text[:-1]) * r["worker_images_per_s"] if text.endswith("x")
                    else float(text))
            _progress(f"pass at {rate:.2f} studies/s ({text}), summary images "
                      f"{'on' if r['summaries'] else 'off'} ...")
            rate_passes.append({"asked": text, **embedded_pass(
                workdir, bundle, study_of, args.quiet, bool(r["summaries"]), rate=rate,
                worker_extra=worker_extra)})
    _progress("measuring the bare network on ready tensors ...")
    bare = _bare_network_rate(bundle)
    print(f"\ne2e: {len(study_of)} single-image studies (512x512 16-bit), quiet period {args.quiet} s, "
          f"bundle {bundle.name}, embedded worker (batch 8), {os.cpu_count()} CPUs"
          + (f", [worker] {worker_extra!r}" if worker_extra else ""))
    print(f"bare network on ready tensors (batch 8): {bare:.2f} images/s, one inference "
          f"{1000 / bare:.0f} ms per image")
    print(f"{'summaries':>9}  {'SRs':>5}  {'summaries':>9}  {'studies/min':>11}  {'worker img/s':>12}  "
          f"{'vs bare':>7}  {'p50 s':>6}  {'p95 s':>6}  {'max s':>6}")
    for r in passes:
        print(f"{'on' if r['summaries'] else 'off':>9}  {r['srs']:>5.0f}  {r['summary_images']:>9.0f}  "
              f"{r['studies_per_min']:>11.1f}  {r['worker_images_per_s']:>12.2f}  "
              f"{r['worker_images_per_s'] / bare:>7.2f}  {r['p50_s']:>6.2f}  {r['p95_s']:>6.2f}  "
              f"{r['max_s']:>6.2f}")
    print("CPU seconds per study on this host (worker: preprocess / settle = SRs, summaries, "
          "files, rows / the rest = the network):")
    print(f"{'pass':>14}  {'worker':>6}  {'prep':>5}  {'settle':>6}  {'rest':>5}  {'serve':>5}  "
          f"{'PACS':>5}  {'storescu':>8}  {'all':>5}")
    for r in passes + rate_passes:
        label = f"{'on' if r['summaries'] else 'off'}" + (f" @{r['asked']}" if "asked" in r else "")
        print(f"{label:>14}  {r['cpu_worker']:>6.3f}  {r['cpu_preprocess']:>5.3f}  "
              f"{r['cpu_settle']:>6.3f}  {r['cpu_network_and_rest']:>5.3f}  {r['cpu_serve']:>5.3f}  "
              f"{r['cpu_pacs']:>5.3f}  {r['cpu_storescu']:>8.3f}  {r['cpu_all']:>5.3f}")
    goal = args.quiet + 2 + 8 / bare
    if rate_passes:
        print(f"fixed arrival rates (goal at half capacity: p95 <= quiet {args.quiet} s + 2 s + one "
              f"batch of 8 at the bare rate {8 / bare:.2f} s = {goal:.2f} s):")
        print(f"{'summaries':>9}  {'asked':>6}  {'studies/s':>9}  {'pushed/s':>8}  {'SRs':>5}  "
              f"{'p50 s':>6}  {'p95 s':>6}  {'max s':>6}")
        for r in rate_passes:
            print(f"{'on' if r['summaries'] else 'off':>9}  {r['asked']:>6}  {r['rate']:>9.2f}  "
                  f"{r['pushed_per_s']:>8.2f}  {r['srs']:>5.0f}  {r['p50_s']:>6.2f}  "
                  f"{r['p95_s']:>6.2f}  {r['max_s']:>6.2f}")
    headline: dict[str, object] = {"bench": "e2e", "studies": len(study_of),
                                   "cpus": os.cpu_count(), "worker_config": worker_extra,
                                   "bare_images_per_s": round(bare, 3),
                                   "worker_vs_bare": [round(r["worker_images_per_s"] / bare, 3)
                                                      for r in passes],
                                   "passes": [_rounded(r) for r in passes]}
    if rate_passes:
        headline.update(latency_goal_s=round(goal, 3),
                        rate_passes=[_rounded(r) for r in rate_passes])
    if len(passes) == 2:
        on, off = passes
        extra = 1 / on["worker_images_per_s"] - 1 / off["worker_images_per_s"]
        print(f"summary cost per study: {extra * 1000:.0f} ms of worker time "
              f"({extra * bare:.2f} inferences; goal: at most 1); with summaries the worker runs at "
              f"{on['worker_images_per_s'] / off['worker_images_per_s']:.2f} of its rate without")
        print(f"of which building and writing the summary and its previews (median, timed in the "
              f"worker): {on['summary_ms_p50']:.0f} ms; the rest is the heatmap's backward pass and "
              "the serve process sending one more object per study on the same cores")
        headline.update(summary_cost_ms=round(extra * 1000, 1),
                        summary_cost_inferences=round(extra * bare, 3))
    print(json.dumps(headline))
    return 0 if all(r["srs"] == len(study_of) for r in passes + rate_passes) else 1


def _rounded(r: Mapping[str, object]) -> dict[str, object]:
    return {k: round(float(v), 3) if isinstance(v, int | float) else v for k, v in r.items()}


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a live process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def embedded_pass(workdir: Path, bundle: Path, study_of: dict[str, Path], quiet: float,
                  summaries: bool, rate: float | None = None,
                  worker_extra: str = "") -> dict[str, float]:
    """One pass through `serve` with its embedded worker, summary images on or off; the studies
    pushed as fast as storescu goes, or at ``rate`` studies/s."""
    run = workdir / (f"run-{int(time.time())}-summaries-{'on' if summaries else 'off'}"
                     + (f"-rate-{rate:.2f}" if rate else ""))
    pacs, pacs_dir, cfg, port = start_pacs(run, quiet, bundle, embedded=True, summaries=summaries,
                                           worker_extra=worker_extra)
    log = (run / "daemon.log").open("wb")
    daemon = subprocess.Popen([OPACITYD, "--config", str(cfg), "serve"], stdout=log,
                              stderr=subprocess.STDOUT)
    try:
        wait_for_worker(run / "daemon.log", daemon)
        worker_pid = next(json.loads(line)["pid"] for line in (run / "daemon.log").read_text()
                          .splitlines() if '"worker_process_started"' in line)
        cpu_before = {"serve": _cpu_s(daemon.pid), "worker": _cpu_s(worker_pid),
                      "pacs": _cpu_s(pacs.pid), "storescu": _children_cpu_s()}
        released, arrived, started, finished = push_and_collect(study_of, port, pacs_dir, rate)
        if summaries:  # the summary follows its SR: wait for the last ones (1 min at most)
            deadline = time.monotonic() + 60
            while len(list(pacs_dir.glob("SC*"))) < len(arrived) and time.monotonic() < deadline:
                time.sleep(0.1)
        cpu = {"serve": _cpu_s(daemon.pid) - cpu_before["serve"],
               "worker": _cpu_s(worker_pid) - cpu_before["worker"],
               "pacs": _cpu_s(pacs.pid) - cpu_before["pacs"],
               "storescu": _children_cpu_s() - cpu_before["storescu"]}
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=120)
        pacs.terminate()
        pacs.wait(timeout=30)
        log.close()
    latencies = np.array([arrived[s] - released[s] for s in arrived if s in released])
    events = [json.loads(line) for line in (run / "daemon.log").read_text().splitlines()
              if line.startswith("{")]
    scored = [e for e in events if e["event"] == "study_scored"]
    stopped: dict[str, Any] = next((e for e in events if e["event"] == "worker_stopped"), {})
    split: dict[str, float] = stopped.get("cpu_s") or {}
    process_cpu = split.get("process") or float("nan")
    n = max(len(arrived), 1)
    stamps = sorted(time.mktime(time.strptime(e["timestamp"][:19], "%Y-%m-%dT%H:%M:%S"))
                    + float("0." + e["timestamp"][20:26]) for e in scored)
    worker_rate = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
    made = [float(e["summary_ms"]) for e in scored if e.get("summary") and "summary_ms" in e]
    pushes = sorted(released.values())
    return {"summaries": float(summaries), "rate": rate or 0.0,
            "pushed_per_s": (len(pushes) - 1) / (pushes[-1] - pushes[0]) if len(pushes) > 1 else 0.0,
            "srs": len(arrived),
            "summary_images": len(list(pacs_dir.glob("SC*"))),
            "summary_ms_p50": float(np.median(made)) if made else 0.0,
            "cpu_worker": cpu["worker"] / n, "cpu_serve": cpu["serve"] / n,
            "cpu_pacs": cpu["pacs"] / n, "cpu_storescu": cpu["storescu"] / n,
            "cpu_all": sum(cpu.values()) / n,
            # the worker's own split covers its whole run; scaled to the pass's worker CPU
            **{f"cpu_{stage}": split.get(stage, float("nan")) / process_cpu * cpu["worker"] / n
               for stage in ("preprocess", "settle", "network_and_rest")},
            "studies_per_min": len(arrived) / (finished - started) * 60,
            "worker_images_per_s": worker_rate,
            "p50_s": float(np.percentile(latencies, 50)) if len(latencies) else float("nan"),
            "p95_s": float(np.percentile(latencies, 95)) if len(latencies) else float("nan"),
            "max_s": float(latencies.max()) if len(latencies) else float("nan")}


def start_pacs(run: Path, quiet: float, bundle: Path, *, embedded: bool, database_url: str = "",
               summaries: bool = True, worker_extra: str = ""
               ) -> tuple[subprocess.Popen[bytes], Path, Path, int]:
    """A DCMTK storescp PACS in ``run/pacs`` and a `serve` config that delivers to it;
    returns (the PACS process, its folder, the config, the receiver's port)."""
    pacs_dir = run / "pacs"
    pacs_dir.mkdir(parents=True)
    pacs_port, port = free_port(), free_port()
    pacs = subprocess.Popen([STORESCP, "-aet", "PACS", "-od", str(pacs_dir), str(pacs_port)],
                            env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    extra = (f'[[destinations]]\nname = "pacs"\nhost = "127.0.0.1"\nport = {pacs_port}\n'
             'called_ae = "PACS"\n[delivery]\npoll_interval_s = 0.1\n'
             f'[worker]\nembedded = {str(embedded).lower()}\npoll_interval_s = 0.1\nbatch_size = 8\n'
             f'{worker_extra}\n'
             f'[summary]\nenabled = {str(summaries).lower()}\n')
    cfg = write_config(run / "d", extra, port=port, quiet_s=quiet, bundle=bundle,
                       database_url=database_url)
    return pacs, pacs_dir, cfg, port


def push_and_collect(study_of: dict[str, Path], port: int, pacs_dir: Path, rate: float | None = None
                     ) -> tuple[dict[str, float], dict[str, float], float, float]:
    """Each study in its own storescu association (as fast as they go, or the i-th at
    ``i / rate`` s), then wait for every SR (10 min at most); returns (release times, SR arrival
    times, start, finish)."""
    released: dict[str, float] = {}
    arrived: dict[str, float] = {}
    seen: set[str] = set()
    started = time.monotonic()
    for i, (study_uid, path) in enumerate(study_of.items()):
        while rate and time.monotonic() < started + i / rate:
            collect_srs(pacs_dir, arrived, seen)
            time.sleep(min(0.02, max(0.0, started + i / rate - time.monotonic())))
        subprocess.run([STORESCU, "-aec", "OPACITYD", "127.0.0.1", str(port), str(path)],
                       env=DCMTK_ENV, check=True, capture_output=True)
        released[study_uid] = time.monotonic()
        collect_srs(pacs_dir, arrived, seen)
        if (i + 1) % 20 == 0:
            _progress(f"pushed {i + 1}/{len(study_of)}, SRs at the PACS: {len(arrived)}")
    deadline = time.monotonic() + 600
    while len(arrived) < len(study_of) and time.monotonic() < deadline:
        collect_srs(pacs_dir, arrived, seen)
        time.sleep(0.05)
    return released, arrived, started, time.monotonic()


def worker_pass(workdir: Path, bundle: Path, study_of: dict[str, Path], quiet: float, workers: int,
                database_url: str) -> dict[str, float]:
    """One pass: `serve` (no embedded worker) plus ``workers`` `opacityd worker` processes."""
    run = workdir / f"run-{int(time.time())}-w{workers}"
    pacs, pacs_dir, cfg, port = start_pacs(run, quiet, bundle, embedded=False,
                                           database_url=database_url)
    procs: list[subprocess.Popen[bytes]] = []
    logs = [run / "serve.log", *(run / f"worker{i}.log" for i in range(workers))]
    try:
        for i, log_path in enumerate(logs):
            command = "serve" if i == 0 else "worker"
            with log_path.open("wb") as log:
                procs.append(subprocess.Popen([OPACITYD, "--config", str(cfg), command], stdout=log,
                                              stderr=subprocess.STDOUT))
        for log_path, proc in zip(logs[1:], procs[1:], strict=True):
            wait_for_worker(log_path, proc)
        released, arrived, started, finished = push_and_collect(study_of, port, pacs_dir)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=120)
        pacs.terminate()
        pacs.wait(timeout=30)
    latencies = np.array([arrived[s] - released[s] for s in arrived if s in released])
    return {"workers": workers, "srs": len(arrived),
            "studies_per_min": len(arrived) / (finished - started) * 60,
            "p50_s": float(np.percentile(latencies, 50)) if len(latencies) else float("nan"),
            "p95_s": float(np.percentile(latencies, 95)) if len(latencies) else float("nan"),
            "max_s": float(latencies.max()) if len(latencies) else float("nan")}


def compare_workers(workdir: Path, bundle: Path, study_of: dict[str, Path], quiet: float,
                    counts: list[int], database: str) -> int:
    """A pass per worker count, side by side; returns 1 when an SR is missing."""
    cluster = PostgresCluster().start() if database == "postgres" else None
    passes = []
    try:
        for workers in counts:
            _progress(f"pass with {workers} worker process(es) on {database} ...")
            url = cluster.new_database() if cluster is not None else ""
            passes.append(worker_pass(workdir, bundle, study_of, quiet, workers, url))
    finally:
        if cluster is not None:
            cluster.destroy()
    print(f"\ne2e: {len(study_of)} single-image studies (512x512 16-bit), quiet period {quiet} s, "
          f"bundle {bundle.name}, {database}, `serve` + N `opacityd worker` processes")
    print(f"{'workers':>7}  {'SRs':>5}  {'studies/min':>11}  {'vs 1':>5}  {'p50 s':>6}  {'p95 s':>6}  "
          f"{'max s':>6}")
    base = passes[0]["studies_per_min"]
    for r in passes:
        print(f"{r['workers']:>7}  {r['srs']:>5}  {r['studies_per_min']:>11.1f}  "
              f"{r['studies_per_min'] / base:>5.2f}  {r['p50_s']:>6.2f}  {r['p95_s']:>6.2f}  "
              f"{r['max_s']:>6.2f}")
    print(json.dumps({"bench": "e2e", "database": database, "studies": len(study_of),
                      "passes": [{k: round(v, 3) for k, v in r.items()} for r in passes]}))
    return 0 if all(r["srs"] == len(study_of) for r in passes) else 1


def wait_for_worker(log: Path, daemon: subprocess.Popen[bytes], timeout: float = 180) -> None:
    """Until `serve`'s worker has loaded the model (its `worker_started` event in ``log``)."""
    _progress("waiting for the daemon and its worker (model load) ...")
    deadline = time.monotonic() + timeout
    while b"worker_started" not in log.read_bytes():
        if time.monotonic() > deadline or daemon.poll() is not None:
            raise RuntimeError(f"the daemon's worker did not start; see {log}")
        time.sleep(0.2)


def collect_srs(folder: Path, arrived: dict[str, float], seen: set[str]) -> None:
    """Note the arrival time of each new SR file at the PACS, by Study Instance UID."""
    for path in folder.glob("SR*"):
        if path.name in seen:
            continue
        try:
            uid = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"]
                                  ).StudyInstanceUID
        except (OSError, pydicom.errors.InvalidDicomError, AttributeError):
            continue  # still being written
        seen.add(path.name)
        arrived.setdefault(str(uid), time.monotonic())


if __name__ == "__main__":
    sys.exit(main())

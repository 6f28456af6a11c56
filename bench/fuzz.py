"""Fuzz the receiver: mutated data sets over C-STORE and mutated PDUs over raw sockets.

    python -m bench.fuzz [--seed 1] [--datasets 2000] [--pdus 2000] [--workdir bench/out/fuzz]
                         [--port PORT]   # an opacityd serve that is already running

A seeded generator mutates real files from ``../shared/data/dicom`` (bit flips, truncation,
insertions, corrupted element lengths and VRs, swapped chunks) and sends each one, as its raw
bytes, in a C-STORE (pynetdicom, chunked from the file, so nothing re-encodes it); and mutates a
valid A-ASSOCIATE-RQ (and PDUs after a valid association) sent over raw sockets. Every C-STORE
must be answered with a status (success, or a failure with its meaning); the daemon must keep
answering C-ECHO and must not exit. Prints the outcomes by status and every finding (a missing
response, an unknown status, an exit, a lost echo) with the seed and case number that
reproduce it. Without ``--port`` it starts its own `opacityd serve` (worker not embedded: the
parsers are what is fuzzed, not the model). Progress every 10 s on stderr.

The short, fixed-seed run in tests/test_fuzz.py calls :func:`fuzz` with a small budget.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE, _config
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import build_context

VERIFICATION = "1.2.840.10008.1.1"
KNOWN_STATUSES = {0x0000, 0xA700, 0xA900, 0xC000, 0xC001, 0xC002, 0x0122, 0x0124, 0xB000,
                  0xB006, 0xB007}


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def split_file(data: bytes) -> tuple[bytes, bytes]:
    """(preamble + DICM + file meta, data set) of a DICOM Part 10 file."""
    if data[128:132] != b"DICM":
        raise ValueError("not a DICOM Part 10 file")
    group_length = struct.unpack("<I", data[140:144])[0]
    end = 144 + group_length
    return data[:end], data[end:]


def mutate(body: bytes, rng: random.Random) -> bytes:
    """One to three random mutations of ``body`` (a data set or a PDU)."""
    out = bytearray(body)
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(7)
        if not out:
            out += rng.randbytes(rng.randint(1, 64))
            continue
        at = rng.randrange(len(out))
        if kind == 0:  # flip bits
            for _ in range(rng.randint(1, 16)):
                i = rng.randrange(len(out))
                out[i] ^= 1 << rng.randrange(8)
        elif kind == 1:  # truncate
            del out[at:]
        elif kind == 2:  # insert junk
            out[at:at] = rng.randbytes(rng.randint(1, 256))
        elif kind == 3:  # an element or item length made huge, zero or odd
            value = rng.choice([0xFFFFFFFF, 0x7FFFFFFF, 0, 1, rng.randrange(1 << 32)])
            out[at:at + 4] = struct.pack("<I", value)
        elif kind == 4:  # a VR replaced by another or by junk
            out[at:at + 2] = rng.choice([b"SQ", b"UN", b"OB", b"US", b"DA", b"PN", b"\x00\x00",
                                         rng.randbytes(2)])
        elif kind == 5:  # a chunk duplicated somewhere else
            size = rng.randint(1, 512)
            chunk = bytes(out[at:at + size])
            where = rng.randrange(len(out))
            out[where:where] = chunk
        else:  # a chunk deleted
            del out[at:at + rng.randint(1, 512)]
    return bytes(out)


def associate_rq(called: str = "OPACITYD", calling: str = "FUZZ") -> bytes:
    """A valid A-ASSOCIATE-RQ for Verification, as bytes."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    context = build_context(VERIFICATION)
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    length = MaximumLengthNotification()
    length.maximum_length_received = 16384
    primitive.user_information = [length]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


@dataclass
class Report:
    outcomes: Counter[str] = field(default_factory=Counter)
    findings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"  {name}: {count}" for name, count in sorted(self.outcomes.items())]
        lines.append(f"  findings: {len(self.findings)}")
        lines += [f"    {f}" for f in self.findings[:50]]
        return "\n".join(lines)


def _echo(port: int, timeout: float = 10.0) -> bool:
    ae = AE(ae_title="FUZZECHO")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate("127.0.0.1", port, ae_title="OPACITYD")
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and int(status.Status) == 0


def _store_case(assoc_factory: AE, port: int, path: Path) -> tuple[str, bool]:
    """Send ``path``'s raw bytes in one association; (outcome, the association survived)."""
    assoc = assoc_factory.associate("127.0.0.1", port, ae_title="OPACITYD")
    if not assoc.is_established:
        return "association_not_established", False
    try:
        status = assoc.send_c_store(path)
    except (ValueError, AttributeError) as e:
        assoc.abort()
        return f"not_sendable:{type(e).__name__}", True
    if assoc.is_established:
        assoc.release()
    if not status or "Status" not in status:
        return "no_response", True
    code = int(status.Status)
    if code not in KNOWN_STATUSES and not 0xC000 <= code <= 0xCFFF:
        return f"unknown_status:0x{code:04X}", True
    return f"0x{code:04X}", True


def _pdu_case(port: int, payload: bytes, then: bytes | None, timeout: float, hold: bool) -> str:
    """Send ``payload`` (and ``then``, after the answer) on a raw socket; what came back.

    ``hold``: keep our side open after the last bytes (the server must time out a PDU that
    announced more than it got); otherwise half-close, so the server sees the end at once."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(payload)
            if then is None and not hold:
                sock.shutdown(socket.SHUT_WR)
            answer = sock.recv(6)
            if then is not None and answer[:1] == b"\x02":
                sock.sendall(then)
                if not hold:
                    sock.shutdown(socket.SHUT_WR)
                answer = sock.recv(6) or answer
    except TimeoutError:
        return "pdu:no_answer_in_time"
    except OSError as e:
        return f"pdu:closed({type(e).__name__})"
    kind = {b"\x02": "accept", b"\x03": "reject", b"\x07": "abort", b"": "closed"}
    return f"pdu:{kind.get(answer[:1], 'other')}"


def fuzz(port: int, sources: list[Path], workdir: Path, seed: int, datasets: int, pdus: int,
         alive: Callable[[], bool] | None = None, hold_fraction: float = 0.2) -> Report:
    """Run the cases against the SCP on ``port``; ``alive()`` says whether the daemon runs;
    ``hold_fraction`` of the PDU cases keep the socket open after sending (slow: each waits
    for the server's read timeout)."""
    rng = random.Random(seed)
    report = Report()
    _config.STORE_SEND_CHUNKED_DATASET = True
    workdir.mkdir(parents=True, exist_ok=True)
    ae = AE(ae_title="FUZZ")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 15
    files = []
    for source in sources:
        try:
            files.append(split_file(source.read_bytes()))
        except ValueError:
            continue  # a bare data set: pynetdicom cannot send it raw
        meta = dcmread(source, stop_before_pixels=True).file_meta
        context = (str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
        if context not in {(c.abstract_syntax, c.transfer_syntax[0]) for c in ae.requested_contexts}:
            ae.add_requested_context(*context)
    case_path = workdir / "case.dcm"
    last = time.monotonic()
    for n in range(datasets):
        head, body = rng.choice(files)
        case_path.write_bytes(head + mutate(body, rng))
        outcome, _ = _store_case(ae, port, case_path)
        report.outcomes[outcome] += 1
        if outcome in ("no_response", "association_not_established") or outcome.startswith("unknown"):
            report.findings.append(f"dataset seed={seed} case={n}: {outcome}")
            (workdir / f"finding-{seed}-{n}.dcm").write_bytes(case_path.read_bytes())
        if n % 50 == 49:
            _check(port, report, f"dataset seed={seed} after case {n}", alive)
        if time.monotonic() - last > 10:
            last = time.monotonic()
            _progress(f"datasets {n + 1}/{datasets}: {dict(report.outcomes)}")
    request = associate_rq()
    for n in range(pdus):
        if rng.random() < 0.7:
            payload, then = mutate(request, rng), None
        else:  # a valid association, then a mutated P-DATA / release / abort PDU
            pdata = struct.pack(">BBI", 4, 0, 12) + struct.pack(">IBB", 6, 1, 3) + b"\x00\x00\x00\x00"
            payload, then = request, mutate(rng.choice([pdata, b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00",
                                                        b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00"]), rng)
        hold = rng.random() < hold_fraction
        outcome = _pdu_case(port, payload, then, timeout=30, hold=hold)
        report.outcomes[outcome] += 1
        if outcome == "pdu:no_answer_in_time":
            report.findings.append(f"pdu seed={seed} case={n}: no answer and not closed in 30 s")
        if n % 50 == 49:
            _check(port, report, f"pdu seed={seed} after case {n}", alive)
        if time.monotonic() - last > 10:
            last = time.monotonic()
            _progress(f"pdus {n + 1}/{pdus}")
    _check(port, report, f"seed={seed} at the end", alive)
    return report


def _check(port: int, report: Report, where: str, alive: Callable[[], bool] | None) -> None:
    if alive is not None and not alive():
        report.findings.append(f"{where}: the daemon exited")
    elif not _echo(port):
        report.findings.append(f"{where}: C-ECHO not answered")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--datasets", type=int, default=2000)
    p.add_argument("--pdus", type=int, default=2000)
    p.add_argument("--port", type=int, help="fuzz an opacityd serve already listening here")
    p.add_argument("--hold-fraction", type=float, default=0.2,
                   help="share of PDU cases that keep the socket open (each waits a read timeout)")
    p.add_argument("--data", type=Path,
                   default=Path(__file__).resolve().parents[2] / "shared" / "data" / "dicom")
    p.add_argument("--workdir", type=Path, default=Path("bench/out/fuzz"))
    args = p.parse_args(argv)
    sources = sorted(args.data.glob("*.dcm"))
    workdir = args.workdir.resolve()
    proc = None
    port = args.port
    if port is None:
        from tests.conftest import OPACITYD, echoscu, free_port, wait_until, write_config
        bundle = workdir / "demo-bundle"
        if not (bundle / "manifest.json").exists():
            subprocess.run([OPACITYD, "model", "init-demo", str(bundle), "--input-size", "96"],
                           check=True, capture_output=True)
        port = free_port()
        cfg = write_config(workdir / f"run-{args.seed}", "[worker]\nembedded = false\n", port=port,
                           bundle=bundle)
        log = (workdir / f"run-{args.seed}" / "daemon.log").open("wb")
        proc = subprocess.Popen([OPACITYD, "--config", str(cfg), "serve"], stdout=log,
                                stderr=subprocess.STDOUT)
        wait_until(lambda: echoscu(port).returncode == 0, timeout=60, what="opacityd to listen")
    started = time.monotonic()
    try:
        report = fuzz(port, sources, workdir, args.seed, args.datasets, args.pdus,
                      alive=(lambda: proc.poll() is None) if proc is not None else None,
                      hold_fraction=args.hold_fraction)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
    print(f"fuzz seed {args.seed}: {args.datasets} data sets, {args.pdus} PDUs from "
          f"{len(sources)} files (Part 10 ones) in {time.monotonic() - started:.0f} s")
    print(report.summary())
    print(json.dumps({"bench": "fuzz", "seed": args.seed, "datasets": args.datasets,
                      "pdus": args.pdus, "seconds": round(time.monotonic() - started, 1),
                      "findings": len(report.findings)}))
    return 1 if report.findings else 0


if __name__ == "__main__":
    sys.exit(main())

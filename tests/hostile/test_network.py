"""Hostile TCP peers against a real `opacityd serve`: none of them may lock a legitimate sender
out, grow serve's memory without bound, or keep serve from answering C-ECHO afterwards."""

from __future__ import annotations

import json
import random
import socket
import ssl
import struct
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import (
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    Verification,
)

from daemon.config import load_config
from daemon.spool import INCOMING
from tests.conftest import free_port, wait_until, write_config
from tests.daemon_process import DaemonProcess, start_daemon
from tests.hostile.conftest import (
    HOSTILE_RECEIVER,
    HUGE,
    LEGIT_BOUND_S,
    RSS_GROWTH_BOUND_KIB,
    RssWatch,
    Target,
    attacker,
    closed_by_peer,
    echo_seconds,
    pdu_header,
    store_seconds,
)
from tests.test_tls import _associate as _tls_associate
from tests.test_tls import _client_context, _tls_config

A_ASSOCIATE_RQ, P_DATA_TF = 0x01, 0x04


def _streams_until_closed(sock: socket.socket, header: bytes, total: int) -> int:
    """Sends ``header`` then zeros up to ``total`` bytes; returns how many were sent before
    the peer closed the connection (``total`` if it never did)."""
    chunk = bytes(1 << 20)
    sent = 0
    sock.settimeout(10)
    try:
        sock.sendall(header)
        while sent < total:
            sent += sock.send(chunk[:total - sent])
    except OSError:
        pass
    return sent


@contextmanager
def _associated(port: int, host: int, contexts: tuple[str, ...] = (Verification,)
                ) -> Iterator[Association]:
    ae = AE(ae_title="HOSTILE")
    for uid in contexts:
        ae.add_requested_context(uid, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="OPACITYD", bind_address=(f"127.0.0.{host}", 0))
    assert assoc.is_established, "the attacker could not associate"
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()
        assoc.kill()


def _raw(assoc: Association) -> socket.socket:
    """The association's TCP socket, to write raw PDUs beside pynetdicom's own."""
    sock = assoc.dul.socket
    assert sock is not None and sock.socket is not None
    return sock.socket


def test_stalled_request_headers_hold_no_slot_and_oversized_ones_are_closed_at_once(
        target: Target) -> None:
    with target.under_attack(), ExitStack() as stack:
        # ~4 GiB announced before association: closed at once, nothing buffered.
        huge = [stack.enter_context(attacker(target.port, 10 + i)) for i in range(10)]
        for sock in huge:
            sock.sendall(pdu_header(A_ASSOCIATE_RQ, HUGE))
        # A plausible length, then a stall: each holds only a pending slot, and 20 of them
        # from 20 addresses overflow the 16 pending slots (the oldest are closed).
        stalled = [stack.enter_context(attacker(target.port, 30 + i)) for i in range(20)]
        for sock in stalled:
            sock.sendall(pdu_header(A_ASSOCIATE_RQ, 60_000) + b"\x00\x01")
        # The same from one address: beyond max_connections_per_address they are refused.
        same = [stack.enter_context(attacker(target.port, 60)) for _ in range(8)]
        for sock in same:
            sock.sendall(pdu_header(A_ASSOCIATE_RQ, 60_000))
        assert all(closed_by_peer(sock, 1.0) for sock in huge)
        assert store_seconds(target.port) < LEGIT_BOUND_S
        assert echo_seconds(target.port) < LEGIT_BOUND_S
        assert sum(closed_by_peer(sock, 0.5) for sock in same) >= 4
        # The request deadline (2 s in this config) closes every stalled one.
        assert all(closed_by_peer(sock, 4.0) for sock in stalled)


def test_bytes_streamed_after_a_huge_header_are_not_buffered(target: Target) -> None:
    results: list[int] = []
    with target.under_attack() as watch, ExitStack() as stack:
        sock = stack.enter_context(attacker(target.port))
        streamer = threading.Thread(target=lambda: results.append(
            _streams_until_closed(sock, pdu_header(A_ASSOCIATE_RQ, HUGE), 256 << 20)))
        streamer.start()
        assert store_seconds(target.port) < LEGIT_BOUND_S
        streamer.join(timeout=30)
        assert not streamer.is_alive()
    assert results[0] < 64 << 20, f"serve took {results[0]} bytes of a PDU it should refuse"
    assert watch.peak - watch.baseline < 32 * 1024


def test_many_idle_connections_neither_lock_senders_out_nor_stay_open(target: Target) -> None:
    with target.under_attack(), ExitStack() as stack:
        idle = [stack.enter_context(attacker(target.port, 2 + i // 2)) for i in range(60)]
        for _ in range(3):
            assert echo_seconds(target.port) < LEGIT_BOUND_S
        assert store_seconds(target.port) < LEGIT_BOUND_S
        assert all(closed_by_peer(sock, 4.0) for sock in idle)


def test_junk_and_close_repeated_keeps_no_slot(target: Target) -> None:
    stop = threading.Event()
    rounds: list[int] = []

    def junk(seed: int) -> None:
        rng = random.Random(seed)
        count = 0
        while not stop.is_set():
            try:
                with attacker(target.port, rng.randint(2, 200)) as sock:
                    sock.sendall(rng.randbytes(rng.randint(1, 300)))
            except OSError:
                pass
            count += 1
        rounds.append(count)

    threads = [threading.Thread(target=junk, args=(seed,)) for seed in range(3)]
    with target.under_attack():
        for t in threads:
            t.start()
        try:
            latencies = [echo_seconds(target.port) for _ in range(3)]
            latencies.append(store_seconds(target.port))
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=30)
    assert max(latencies) < LEGIT_BOUND_S, latencies
    assert sum(rounds) > 50, "the attack did not run"


@pytest.mark.parametrize("announced", ["max_pdu_plus_one", "huge"])
def test_a_p_data_pdu_beyond_the_negotiated_maximum_aborts_the_association(
        target: Target, announced: str) -> None:
    with target.under_attack() as watch, _associated(target.port, 3) as assoc:
        max_pdu = assoc.acceptor.maximum_length or 0
        assert 0 < max_pdu <= 1 << 20, "serve must not advertise an unlimited PDU"
        context_id = assoc.accepted_contexts[0].context_id or 1
        if announced == "max_pdu_plus_one":
            # One byte over, otherwise well formed: a command fragment pynetdicom would keep.
            header = pdu_header(P_DATA_TF, max_pdu + 1) + struct.pack(
                ">LBB", max_pdu - 3, context_id, 0x01)
            total = max_pdu + 1 - 6
        else:
            header, total = pdu_header(P_DATA_TF, HUGE), 256 << 20
        results: list[int] = []
        streamer = threading.Thread(target=lambda: results.append(
            _streams_until_closed(_raw(assoc), header, total)))
        streamer.start()
        assert store_seconds(target.port) < LEGIT_BOUND_S
        wait_until(lambda: assoc.is_aborted or not assoc.is_alive(), timeout=5,
                   what="serve to abort the association")
        streamer.join(timeout=30)
    assert results[0] < 64 << 20
    assert watch.peak - watch.baseline < 48 * 1024


def _store_command(context_id: int) -> bytes:
    """A C-STORE-RQ command set announcing a data set, as one P-DATA-TF PDU."""
    cs = Dataset()
    cs.AffectedSOPClassUID = DigitalXRayImageStorageForPresentation
    cs.CommandField = 0x0001
    cs.MessageID = 1
    cs.Priority = 0
    cs.CommandDataSetType = 0x0000
    cs.AffectedSOPInstanceUID = "1.2.826.0.1.3680043.10.1234.1"
    cs.CommandGroupLength = 0
    cs.CommandGroupLength = len(encode(cs, True, True) or b"") - 12
    command = encode(cs, True, True) or b""
    pdv = struct.pack(">LBB", len(command) + 2, context_id, 0x03) + command
    return pdu_header(P_DATA_TF, len(pdv)) + pdv


def test_a_data_set_beyond_its_bound_in_well_formed_pdus_aborts_the_association(
        target: Target) -> None:
    sent = 0
    with target.under_attack() as watch, _associated(
            target.port, 4, (DigitalXRayImageStorageForPresentation,)) as assoc:
        context_id = assoc.accepted_contexts[0].context_id
        assert context_id is not None
        fragment = (assoc.acceptor.maximum_length or 0) - 6
        assert fragment > 0
        pdu = pdu_header(P_DATA_TF, fragment + 6) + struct.pack(">LBB", fragment + 2, context_id,
                                                                0x00) + bytes(fragment)
        sock = _raw(assoc)
        try:
            sock.sendall(_store_command(context_id))
            while sent < 256 << 20:
                sock.sendall(pdu)
                sent += len(pdu)
        except OSError:
            pass
        wait_until(lambda: assoc.is_aborted or not assoc.is_alive(), timeout=5,
                   what="serve to abort the association")
        assert echo_seconds(target.port) < LEGIT_BOUND_S
    assert sent < 64 << 20, f"serve took {sent} bytes of a data set bounded at 16 MiB"
    # What it had received went to the spool as it arrived; the cut-off transfer leaves nothing.
    incoming = target.config.parent / "state" / "spool" / INCOMING
    wait_until(lambda: not any(p.is_file() for p in incoming.rglob("*")), timeout=5,
               what="the cut-off data set's incoming file to be removed")
    assert watch.peak - watch.baseline < 80 * 1024


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_exhausted_slots_are_rejected_counted_and_fail_readyz_until_freed(target: Target) -> None:
    http = f"http://127.0.0.1:{load_config(target.config, env={}).http.port}"
    assert _get(f"{http}/readyz")[0] == 200
    with ExitStack() as stack:
        for host in range(2, 6):  # max_associations = 4, from four addresses
            stack.enter_context(_associated(target.port, host))
        ae = AE(ae_title="LATECOMER")
        ae.add_requested_context(Verification)
        late = ae.associate("127.0.0.1", target.port, ae_title="OPACITYD")
        assert late.is_rejected
        status, body = wait_until(lambda: (lambda r: r if r[0] == 503 else None)(
            _get(f"{http}/readyz")), timeout=5, what="/readyz to fail")
        assert "every association slot taken" in body
    wait_until(lambda: _get(f"{http}/readyz")[0] == 200, timeout=5, what="/readyz to recover")
    with _associated(target.port, 7, (Verification, CTImageStorage)):
        pass
    metrics = _get(f"{http}/metrics")[1]
    assert 'opacityd_associations_rejected_total{reason="local_limit"} 1.0' in metrics
    assert 'opacityd_presentation_contexts_refused_total{reason="abstract_syntax_not_supported"}' \
        in metrics
    assert "opacityd_association_slots_exhausted_total 1.0" in metrics
    events = [json.loads(line) for line in target.daemon.output().splitlines()
              if line.startswith("{")]
    names = {e.get("event") for e in events}
    assert {"association_slots_exhausted", "association_rejected",
            "presentation_contexts_refused"} <= names


def test_sigterm_with_stalled_connections_exits_within_the_grace(
        tmp_path: Path, daemons: list[DaemonProcess], demo_bundle: Path) -> None:
    grace_s = 2.0
    daemon, _ = start_daemon(tmp_path, daemons,
                             "association_request_timeout_s = 120.0\npdu_read_timeout_s = 120.0\n"
                             "[worker]\nembedded = false\n", grace_s=grace_s, bundle=demo_bundle)
    with ExitStack() as stack:
        for i in range(4):
            stack.enter_context(attacker(daemon.port, 2 + i)).sendall(
                pdu_header(A_ASSOCIATE_RQ, 60_000))
        assoc = stack.enter_context(_associated(daemon.port, 9))
        _raw(assoc).sendall(pdu_header(P_DATA_TF, 1000) + b"\x00" * 10)
        started = time.monotonic()
        assert daemon.terminate(timeout=grace_s + 10) == 0
        assert time.monotonic() - started < grace_s + 3
    assert daemon.proc is not None and daemon.proc.returncode == 0
    assert "receiver_stopped" in daemon.output()



class _TlsDaemon(DaemonProcess):
    """serve with TLS required: started once a TLS C-ECHO with a client certificate works."""

    def __init__(self, config: Path, log: Path, port: int, tls: ssl.SSLContext) -> None:
        super().__init__(config, log, port)
        self.tls = tls

    def _answers_echo(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"opacityd exited with {self.proc.returncode}:\n{self.output()}")
        assoc = _tls_associate(self.port, self.tls)
        if assoc.is_established:
            assoc.release()
            return True
        return False


def test_stalled_tls_handshakes_do_not_block_the_accept_loop(
        tmp_path: Path, daemons: list[DaemonProcess], demo_bundle: Path, pki: Path) -> None:
    port = free_port()
    tls = _client_context(pki, "client")
    cfg = write_config(tmp_path / "d", HOSTILE_RECEIVER + _tls_config(pki, True), port=port,
                       bundle=demo_bundle)
    daemon = _TlsDaemon(cfg, tmp_path / "daemon.log", port, tls)
    daemons.append(daemon)
    daemon.start()
    assert daemon.proc is not None
    watch = RssWatch(daemon.proc.pid)
    with ExitStack() as stack:
        # TCP connected, no ClientHello: upstream's accept loop blocks in the handshake.
        stalled = [stack.enter_context(attacker(port, 2 + i)) for i in range(10)]
        started = time.monotonic()
        assoc = _tls_associate(port, tls)
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        assoc.release()
        assert time.monotonic() - started < LEGIT_BOUND_S
        assert all(closed_by_peer(sock, 4.0) for sock in stalled)
    assert watch.stop() < RSS_GROWTH_BOUND_KIB

"""The DICOM transport guard: what one TCP connection may hold, before and after association.

pynetdicom 3's server starts an association thread for every accepted socket, counts it
against ``maximum_associations`` before a byte has arrived, reads a PDU by allocating the
length its header announces, on a socket with no timeout, and wraps TLS in the accept loop
(docs/pynetdicom-upstream.md). Here, instead:

- A new connection is *pending* until a whole A-ASSOCIATE-RQ has arrived: it is read in the
  connection's own thread, must announce at most ``max_association_request_size`` bytes and
  must be complete (TLS handshake included) within ``association_request_timeout_s``.
  Pending connections have their own cap (``max_pending_connections``; when full the oldest
  is closed), and every source address its own (``max_connections_per_address``). Only a
  complete request takes an association slot, so stalled or idle sockets never lock senders
  out; when every slot is taken the request gets A-ASSOCIATE-RJ (transient, local limit).
- An associated connection reads through :class:`GuardedSocket`: a P-DATA PDU may announce
  at most the ``max_pdu_size`` we advertised, every other PDU at most the request bound, a
  PDU once started must arrive within ``pdu_read_timeout_s``, and the PDV items of one DIMSE
  data set may add up to at most ``max_dataset_size_mb``. A breach gets an A-ABORT and the
  socket closes before any of the announced bytes is buffered. While a complete message waits
  for its handler nothing more is read, so a peer that ignores the DIMSE window cannot queue
  messages in memory.
- ``shutdown()`` closes pending connections at once; ``abort_associations()`` ends the rest
  without waiting on a blocked read, so SIGTERM finishes within the grace.

Every refusal and abort is logged (key-value, never PHI; repeated ones from one address are
summarised), counted in /metrics, and a persistent shortage of slots fails /readyz.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import threading
import time
from collections import Counter
from copy import deepcopy
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, cast

import structlog
from pynetdicom import evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.ae import ApplicationEntity
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.pdu import A_ASSOCIATE_RQ as A_ASSOCIATE_RQ_PDU
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from daemon.config import ReceiverConfig
from daemon.web.health import Check
from daemon.web.metrics import Metrics

log = structlog.get_logger("opacityd.transport")

PDU_HEADER = 6
A_ASSOCIATE_RQ = 0x01
P_DATA_TF = 0x04
KNOWN_PDU_TYPES = frozenset(range(0x01, 0x08))
PDV_HEADER = 6
READ_CHUNK = 65_536
SEND_TIMEOUT_S = 1.0
"""How long a courtesy A-ABORT or A-ASSOCIATE-RJ may take to leave before we close anyway."""
LOG_EVERY_S = 10.0
"""Repeated refusals for one reason and address are logged once per this, with a count."""

# A-ABORT reason/diagnostic values, source 2 = service provider (PS3.8 9.3.8).
ABORT_NOT_SPECIFIED = 0x00
ABORT_UNRECOGNIZED_PDU = 0x01
ABORT_UNEXPECTED_PDU = 0x02
ABORT_INVALID_PARAMETER = 0x06
# A-ASSOCIATE-RJ: rejected transient, service provider (presentation), local limit exceeded.
LOCAL_LIMIT_REJECT = struct.pack(">BBLBBBB", 0x03, 0, 4, 0, 0x02, 0x03, 0x02)

# Presentation context results (PS3.8 9.3.3.2) as metric labels.
CONTEXT_RESULTS = {0x01: "user_rejection", 0x02: "no_reason",
                   0x03: "abstract_syntax_not_supported", 0x04: "transfer_syntaxes_not_supported"}


def abort_pdu(reason: int) -> bytes:
    """An A-ABORT PDU from the service provider with ``reason``."""
    return struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, 0x02, reason)


class Refusal(StrEnum):
    """Why a connection was closed before it was associated."""

    PER_ADDRESS_LIMIT = "per_address_limit"
    PENDING_EVICTED = "pending_evicted"
    SHUTTING_DOWN = "shutting_down"
    REQUEST_TIMEOUT = "request_timeout"
    OVERSIZED_PDU = "oversized_pdu"
    UNEXPECTED_PDU = "unexpected_pdu"
    TLS_FAILED = "tls_handshake_failed"
    PEER_CLOSED = "peer_closed"
    UNDECODABLE_REQUEST = "undecodable_request"
    """A well-framed A-ASSOCIATE-RQ whose items do not decode. Left to pynetdicom, its DUL
    answers A-ABORT and then waits in Sta13 for the ARTIM timer while the connection keeps
    its association slot and its per-address count (found by bench/fuzz)."""


class Abort(StrEnum):
    """Why the guard aborted an established association."""

    OVERSIZED_PDU = "oversized_pdu"
    READ_TIMEOUT = "read_timeout"
    COMMAND_TOO_LARGE = "command_too_large"
    DATASET_TOO_LARGE = "dataset_too_large"
    SHUTDOWN = "shutdown"


@dataclass(frozen=True)
class Limits:
    """The transport bounds, taken from ``[receiver]`` (config.toml documents each)."""

    max_pdu: int
    max_request: int
    request_timeout_s: float
    pdu_read_timeout_s: float
    send_timeout_s: float
    max_pending: int
    per_address: int
    max_associations: int
    max_dataset: int
    unready_after_s: float

    @classmethod
    def from_config(cls, r: ReceiverConfig) -> Limits:
        return cls(max_pdu=r.max_pdu_size, max_request=r.max_association_request_size,
                   request_timeout_s=r.association_request_timeout_s,
                   pdu_read_timeout_s=r.pdu_read_timeout_s, send_timeout_s=r.network_timeout_s,
                   max_pending=r.max_pending_connections, per_address=r.max_connections_per_address,
                   max_associations=r.max_associations, max_dataset=r.max_dataset_size_mb * 2**20,
                   unready_after_s=r.slots_exhausted_unready_s)


class _Refused(Exception):
    def __init__(self, reason: Refusal, abort: int | None = None, **detail: Any) -> None:
        super().__init__(reason.value)
        self.reason, self.abort, self.detail = reason, abort, detail


@dataclass(eq=False)
class _Connection:
    """One accepted TCP connection, from accept to close."""

    address: str
    sock: socket.socket
    opened: float
    associated: bool = False
    evicted: bool = False
    stream: GuardedSocket | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def swap(self, sock: socket.socket) -> None:
        with self.lock:
            self.sock = sock

    def shut(self) -> None:
        """Wake the connection's reader: its recv returns at once, it then closes."""
        with self.lock:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)


class _Throttle:
    """Allows one log line per (reason, address) per interval, and at most ``per_reason`` lines
    per reason per interval over all addresses (a flood from many addresses stays readable);
    says how many were held back meanwhile."""

    def __init__(self, interval_s: float, per_reason: int = 20) -> None:
        self.interval_s = interval_s
        self.per_reason = per_reason
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}
        self._reasons: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def allow(self, key: tuple[str, str]) -> int | None:
        """The number suppressed since the last line when this one may be logged, else None."""
        now = time.monotonic()
        with self._lock:
            last, held = self._seen.get(key, (-self.interval_s, 0))
            window, lines = self._reasons.get(key[0], (now, 0))
            if now - window >= self.interval_s:
                window, lines = now, 0
            if now - last < self.interval_s or lines >= self.per_reason:
                self._seen[key] = (last, held + 1)
                return None
            if len(self._seen) > 4096:
                self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self.interval_s}
            self._seen[key] = (now, 0)
            self._reasons[key[0]] = (window, lines + 1)
            return held


def _send_quietly(sock: socket.socket, data: bytes, timeout_s: float = SEND_TIMEOUT_S) -> None:
    """Send ``data`` if the peer takes it within ``timeout_s``; a courtesy, never a wait."""
    with contextlib.suppress(OSError):
        sock.settimeout(timeout_s)
        sock.sendall(data)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


class _PdvMeter:
    """Adds up the PDV items of the DIMSE message being received, as P-DATA bytes pass by.

    A message is one command set and, optionally, one data set, each split into fragments
    whose last one carries the "last" bit (PS3.8 E.2). Returns the breach, if any.
    """

    def __init__(self, max_command: int, max_dataset: int) -> None:
        self.max_command, self.max_dataset = max_command, max_dataset
        self._header = bytearray()
        self._left = 0
        self._command = 0
        self._dataset = 0

    def new_pdu(self) -> None:
        """PDV items never span PDUs."""
        self._header.clear()
        self._left = 0

    def feed(self, chunk: bytes | bytearray) -> Abort | None:
        i, n = 0, len(chunk)
        while i < n:
            if self._left:
                step = min(self._left, n - i)
                i += step
                self._left -= step
                continue
            need = PDV_HEADER - len(self._header)
            self._header += chunk[i:i + need]
            i += min(need, n - i)
            if len(self._header) < PDV_HEADER:
                break
            item_length = int.from_bytes(self._header[:4], "big")
            control = self._header[5]
            self._header.clear()
            self._left = max(item_length - 2, 0)
            if control & 0x01:
                self._command += self._left
                if self._command > self.max_command:
                    return Abort.COMMAND_TOO_LARGE
                if control & 0x02:
                    self._command = 0
            else:
                self._dataset += self._left
                if self._dataset > self.max_dataset:
                    return Abort.DATASET_TOO_LARGE
                if control & 0x02:
                    self._dataset = 0
        return None


class GuardedSocket(AssociationSocket):
    """The association's socket, read PDU by PDU within the negotiated bounds.

    pynetdicom's DUL reads a header (``recv(6)``) and then asks for the whole announced
    length at once; this class follows the PDU stream itself, so it does not depend on how
    the DUL splits its reads. ``prefix`` holds the A-ASSOCIATE-RQ already read and checked.
    """

    def __init__(self, assoc: Association, client_socket: socket.socket, prefix: bytes,
                 server: GuardedAssociationServer, conn: _Connection) -> None:
        self._prefix = bytearray(prefix)
        self._server = server
        self._conn = conn
        self._limits = server.limits
        self._header = bytearray()
        self._left = 0
        self._in_pdata = False
        self._deadline = 0.0
        self._meter = _PdvMeter(server.limits.max_request, server.limits.max_dataset)
        self._dead = False
        self._send_lock = threading.Lock()
        super().__init__(assoc, client_socket=client_socket)

    @property
    def ready(self) -> bool:
        """Data to read: the replayed request first; nothing while a whole message waits."""
        if self._prefix:
            return True
        if not self._dead and self.assoc.dimse.msg_queue.qsize() > 0:
            return False
        return bool(super().ready)

    def recv(self, nr_bytes: int) -> bytearray:
        """Up to ``nr_bytes``; fewer (so the DUL sees a closed transport) after a breach."""
        out = bytearray(self._prefix[:nr_bytes])
        del self._prefix[:nr_bytes]
        while len(out) < nr_bytes and not self._dead:
            chunk = self._read_some(nr_bytes - len(out))
            if not chunk:
                break
            out += chunk
        return out

    def send(self, bytestream: bytes) -> None:
        with self._send_lock:
            if self.socket is not None:
                with contextlib.suppress(OSError):
                    self.socket.settimeout(self._limits.send_timeout_s)
            super().send(bytestream)

    def abort_now(self, reason: Abort, **detail: Any) -> None:
        """Send an A-ABORT and close, from any thread; a blocked read returns at once."""
        if self._dead:
            return
        self._dead = True
        sock = self.socket
        if sock is not None:
            with self._send_lock:
                _send_quietly(sock, abort_pdu(ABORT_INVALID_PARAMETER if reason in (
                    Abort.OVERSIZED_PDU, Abort.COMMAND_TOO_LARGE, Abort.DATASET_TOO_LARGE)
                    else ABORT_NOT_SPECIFIED))
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._server.note_abort(reason, self._conn.address, self.assoc, **detail)

    def _read_some(self, wanted: int) -> bytes:
        sock = self.socket
        if sock is None:
            return b""
        if self._left == 0 and not self._header:
            self._deadline = time.monotonic() + self._limits.pdu_read_timeout_s
        if self._left == 0:
            size = min(wanted, PDU_HEADER - len(self._header))
        else:
            size = min(wanted, self._left, READ_CHUNK)
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            self.abort_now(Abort.READ_TIMEOUT, timeout_s=self._limits.pdu_read_timeout_s)
            return b""
        try:
            sock.settimeout(remaining)
            chunk = sock.recv(size)
        except TimeoutError:
            self.abort_now(Abort.READ_TIMEOUT, timeout_s=self._limits.pdu_read_timeout_s)
            return b""
        except OSError:
            return b""
        if not chunk:
            return b""
        if self._left == 0:
            self._header += chunk
            if len(self._header) == PDU_HEADER:
                pdu_type, _, length = struct.unpack(">BBL", self._header)
                self._header.clear()
                limit = self._limits.max_pdu if pdu_type == P_DATA_TF else self._limits.max_request
                if length > limit:
                    self.abort_now(Abort.OVERSIZED_PDU, pdu_type=f"0x{pdu_type:02X}",
                                   announced_bytes=length, limit_bytes=limit)
                    return b""
                self._left = length
                self._in_pdata = pdu_type == P_DATA_TF
                self._meter.new_pdu()
            return bytes(chunk)
        self._left -= len(chunk)
        if self._in_pdata:
            breach = self._meter.feed(chunk)
            if breach is not None:
                self.abort_now(breach, limit_bytes=(self._limits.max_dataset
                                                    if breach is Abort.DATASET_TOO_LARGE
                                                    else self._limits.max_request))
                return b""
        return bytes(chunk)


class GuardedRequestHandler(RequestHandler):
    """Reads and checks the A-ASSOCIATE-RQ, takes a slot, then runs the association to its end."""

    server: GuardedAssociationServer
    _prefix: bytes
    _conn: _Connection

    def handle(self) -> None:
        server = self.server
        conn = server.connection(self.request)
        associated = False
        try:
            try:
                request = self._read_request(conn)
            except _Refused as refused:
                if refused.abort is not None:
                    _send_quietly(conn.sock, abort_pdu(refused.abort))
                server.note_refusal(refused.reason, conn.address, **refused.detail)
                return
            associated = server.take_slot(conn)
            if not associated:
                _send_quietly(conn.sock, LOCAL_LIMIT_REJECT)
                return
            self._prefix, self._conn = request, conn
            assoc = self._create_association()
            evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
            assoc.start()
            assoc.join()
        finally:
            _close(conn.sock)
            server.release(conn, associated)

    def _read_request(self, conn: _Connection) -> bytes:
        """The whole A-ASSOCIATE-RQ PDU within the deadline and size bound; raises _Refused."""
        limits = self.server.limits
        deadline = conn.opened + limits.request_timeout_s
        context = self.server.ssl_context
        if context is not None:
            raw = conn.sock
            try:
                raw.settimeout(max(deadline - time.monotonic(), 0.001))
                tls = context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
                conn.swap(tls)
                self.request = tls
                tls.do_handshake()
            except TimeoutError as e:
                raise self._closed(conn, Refusal.REQUEST_TIMEOUT) from e
            except ssl.SSLError as e:
                raise _Refused(Refusal.TLS_FAILED, error=e.reason or type(e).__name__) from e
            except OSError as e:
                raise self._closed(conn, Refusal.PEER_CLOSED) from e
        header = self._read_exactly(conn, PDU_HEADER, deadline)
        pdu_type, _, length = struct.unpack(">BBL", header)
        if pdu_type != A_ASSOCIATE_RQ:
            raise _Refused(Refusal.UNEXPECTED_PDU,
                           ABORT_UNEXPECTED_PDU if pdu_type in KNOWN_PDU_TYPES
                           else ABORT_UNRECOGNIZED_PDU, pdu_type=f"0x{pdu_type:02X}")
        if length > limits.max_request:
            raise _Refused(Refusal.OVERSIZED_PDU, ABORT_INVALID_PARAMETER, pdu_type="0x01",
                           announced_bytes=length, limit_bytes=limits.max_request)
        request = header + self._read_exactly(conn, length, deadline)
        try:
            A_ASSOCIATE_RQ_PDU().decode(request)
        except Exception as e:  # noqa: BLE001 - the request's boundary: refused and recorded, the server goes on
            raise _Refused(Refusal.UNDECODABLE_REQUEST, ABORT_INVALID_PARAMETER,
                           error=type(e).__name__) from e
        return request

    def _read_exactly(self, conn: _Connection, size: int, deadline: float) -> bytes:
        buf = bytearray()
        while len(buf) < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._closed(conn, Refusal.REQUEST_TIMEOUT)
            try:
                conn.sock.settimeout(remaining)
                chunk = conn.sock.recv(min(size - len(buf), READ_CHUNK))
            except TimeoutError as e:
                raise self._closed(conn, Refusal.REQUEST_TIMEOUT) from e
            except OSError as e:
                raise self._closed(conn, Refusal.PEER_CLOSED) from e
            if not chunk:
                raise self._closed(conn, Refusal.PEER_CLOSED)
            buf += chunk
        return bytes(buf)

    def _closed(self, conn: _Connection, reason: Refusal) -> _Refused:
        """The refusal for a read that ended: ours if we closed it (eviction, shutdown)."""
        if conn.evicted:
            return _Refused(Refusal.PENDING_EVICTED)
        if self.server.closing:
            return _Refused(Refusal.SHUTTING_DOWN)
        if reason is Refusal.REQUEST_TIMEOUT:
            return _Refused(reason, timeout_s=self.server.limits.request_timeout_s)
        return _Refused(reason)

    def _create_association(self) -> Association:
        """pynetdicom's RequestHandler._create_association with a :class:`GuardedSocket`
        that replays the request already read (the upstream method builds its socket inline)."""
        server = self.server
        assoc = Association(self.ae, MODE_ACCEPTOR)
        assoc._server = server
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"
        stream = GuardedSocket(assoc, self._conn.sock, self._prefix, server, self._conn)
        self._conn.stream = stream
        assoc.set_socket(stream)
        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        assoc.acceptor.supported_contexts = deepcopy(server.contexts)
        assoc.requestor.address_info = self.remote
        for event, handlers in server._handlers.items():
            if event.is_intervention and handlers:
                assoc.bind(event, *handlers)
            elif isinstance(event, evt.NotificationEvent):
                for handler in cast(list[tuple[Any, Any]], handlers):
                    assoc.bind(event, handler[0], handler[1])
        return assoc


class GuardedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the connection bounds of :class:`Limits`."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 128
    """The listen backlog; TCPServer's 5 makes a connect flood delay senders by SYN retries."""

    def __init__(self, ae: ApplicationEntity, address: tuple[str, int] | tuple[str, int, int, int],
                 ae_title: str, contexts: list[PresentationContext],
                 ssl_context: ssl.SSLContext | None = None,
                 evt_handlers: list[evt.EventHandlerType] | None = None, *, limits: Limits,
                 metrics: Metrics | None = None, reuse_port: bool = False) -> None:
        self.limits = limits
        self.reuse_port = reuse_port
        self.metrics = metrics
        self.closing = False
        self._lock = threading.Lock()
        self._conns: dict[socket.socket, _Connection] = {}
        self._per_address: Counter[str] = Counter()
        self._associated = 0
        self._exhausted_since: float | None = None
        self._pending_full_since: float | None = None
        self._throttle = _Throttle(LOG_EVERY_S)
        super().__init__(ae, address, ae_title, contexts, ssl_context, evt_handlers,
                         request_handler=GuardedRequestHandler)
        self.bind(evt.EVT_ACCEPTED, self._on_accepted)
        if metrics is not None:
            metrics.connections.labels("pending").set_function(lambda: self.counts()[1])
            metrics.connections.labels("associated").set_function(lambda: self.counts()[0])

    def server_bind(self) -> None:
        """With ``reuse_port``, several receiver processes listen on the one port and the
        kernel spreads new connections over them (SO_REUSEPORT, Linux 3.9)."""
        if self.reuse_port:
            cast(socket.socket, self.socket).setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    # -- accept loop -------------------------------------------------------------------

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept only: TLS is negotiated in the connection's thread, under its deadline."""
        listener = cast(socket.socket, self.socket)
        client, address = listener.accept()
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Admit the connection as pending, or refuse it (the caller closes it at once)."""
        address = str(client_address[0])
        sock = cast(socket.socket, request)
        refusal: Refusal | None = None
        evicted: _Connection | None = None
        with self._lock:
            if self.closing:
                refusal = Refusal.SHUTTING_DOWN
            elif self._per_address[address] >= self.limits.per_address:
                refusal = Refusal.PER_ADDRESS_LIMIT
            else:
                pending = self._pending()
                if len(pending) >= self.limits.max_pending:
                    evicted = min(pending, key=lambda c: c.opened)
                    evicted.evicted = True
                self._conns[sock] = _Connection(address, sock, time.monotonic())
                self._per_address[address] += 1
                self._update_clocks()
        if evicted is not None:
            evicted.shut()
        if refusal is not None:
            self.note_refusal(refusal, address, connections_from_address=self._per_address[address])
            return False
        return True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """An unexpected error in a connection's thread: logged once, the connection dropped."""
        log.error("connection_handler_failed", address=str(client_address[0]), exc_info=True)

    # -- bookkeeping -------------------------------------------------------------------

    def connection(self, sock: socket.socket) -> _Connection:
        with self._lock:
            return self._conns[sock]

    def _pending(self) -> list[_Connection]:
        return [c for c in self._conns.values() if not c.associated and not c.evicted]

    def counts(self) -> tuple[int, int]:
        """(associations holding a slot, pending connections)."""
        with self._lock:
            return self._associated, len(self._pending())

    def _update_clocks(self) -> None:
        now = time.monotonic()
        if self._associated >= self.limits.max_associations:
            if self._exhausted_since is None:
                self._exhausted_since = now
                log.warning("association_slots_exhausted", associations=self._associated,
                            max_associations=self.limits.max_associations)
                if self.metrics is not None:
                    self.metrics.slots_exhausted.inc()
        elif self._exhausted_since is not None:
            log.info("association_slots_available", associations=self._associated,
                     exhausted_s=round(now - self._exhausted_since, 1))
            self._exhausted_since = None
        if len(self._pending()) >= self.limits.max_pending:
            self._pending_full_since = self._pending_full_since or now
        else:
            self._pending_full_since = None

    def take_slot(self, conn: _Connection) -> bool:
        """Turn a pending connection into an association, or say every slot is taken."""
        with self._lock:
            taken = self._associated < self.limits.max_associations
            if taken:
                self._associated += 1
                conn.associated = True
            self._update_clocks()
            associations = self._associated
        if not taken:
            self._note("association_rejected", "local_limit", conn.address,
                       associations=associations, max_associations=self.limits.max_associations)
            if self.metrics is not None:
                self.metrics.rejected.labels("local_limit").inc()
        return taken

    def release(self, conn: _Connection, associated: bool) -> None:
        """The connection has closed: free its slot (if it held one) and its address count."""
        with self._lock:
            if associated:
                self._associated -= 1
                conn.associated = False
            self._drop(conn)

    def _drop(self, conn: _Connection) -> None:
        if self._conns.pop(conn.sock, None) is None:
            # The TLS socket replaced the accepted one under which it was registered.
            for key, value in list(self._conns.items()):
                if value is conn:
                    del self._conns[key]
        self._per_address[conn.address] -= 1
        if self._per_address[conn.address] <= 0:
            del self._per_address[conn.address]
        self._update_clocks()

    # -- reporting ---------------------------------------------------------------------

    def _note(self, event: str, reason: str, address: str, **detail: Any) -> None:
        held = self._throttle.allow((reason, address))
        if held is None:
            return
        if held:
            detail["suppressed"] = held
        if reason in (Refusal.PEER_CLOSED, Refusal.SHUTTING_DOWN):
            log.info(event, reason=reason, address=address, **detail)
        else:
            log.warning(event, reason=reason, address=address, **detail)

    def note_refusal(self, reason: Refusal, address: str, **detail: Any) -> None:
        self._note("connection_refused", reason.value, address, **detail)
        if self.metrics is not None:
            self.metrics.connections_refused.labels(reason.value).inc()

    def note_abort(self, reason: Abort, address: str, assoc: Association, **detail: Any) -> None:
        calling = str(assoc.requestor.ae_title or "").strip()
        self._note("association_aborted_by_guard", reason.value, address, calling_ae=calling,
                   **detail)
        if self.metrics is not None:
            self.metrics.associations_aborted.labels(reason.value).inc()

    def _on_accepted(self, event: Event) -> None:
        refused = event.assoc.rejected_contexts
        if not refused:
            return
        reasons = Counter(CONTEXT_RESULTS.get(cx.result or 0, "other") for cx in refused)
        # Modalities often propose every storage class they know: info while some context
        # was accepted, a warning when none was (the association can do nothing).
        accepted = event.assoc.accepted_contexts
        emit = log.info if accepted else log.warning
        emit("presentation_contexts_refused",
             calling_ae=str(event.assoc.requestor.ae_title or "").strip(),
             address=str(event.assoc.requestor.address), refused=len(refused),
             accepted=len(accepted), reasons=dict(reasons),
             abstract_syntaxes=sorted({str(cx.abstract_syntax) for cx in refused})[:16])
        if self.metrics is not None:
            for reason, count in reasons.items():
                self.metrics.contexts_refused.labels(reason).inc(count)

    def readiness(self) -> Check:
        """Fails once every association slot, or every pending slot, has been taken for
        ``slots_exhausted_unready_s``: senders are being turned away, not just busy."""
        now = time.monotonic()
        with self._lock:
            associated, pending = self._associated, len(self._pending())
            exhausted, pending_full = self._exhausted_since, self._pending_full_since
        limits = self.limits
        detail = (f"{associated}/{limits.max_associations} association slots, "
                  f"{pending}/{limits.max_pending} pending connections")
        if exhausted is not None and now - exhausted >= limits.unready_after_s:
            return Check(False, f"{detail}: every association slot taken for "
                                f"{now - exhausted:.0f} s, senders get A-ASSOCIATE-RJ (local limit)")
        if pending_full is not None and now - pending_full >= limits.unready_after_s:
            return Check(False, f"{detail}: pending connections full for {now - pending_full:.0f} s, "
                                "the oldest are being closed")
        return Check(True, detail)

    # -- stopping ----------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop accepting and close every pending connection at once."""
        with self._lock:
            self.closing = True
            pending = self._pending()
        for conn in pending:
            conn.shut()
        super().shutdown()

    def abort_associations(self) -> int:
        """A-ABORT every association still open, without waiting on their reads; returns how many."""
        with self._lock:
            streams = [c.stream for c in self._conns.values() if c.associated and c.stream]
        for stream in streams:
            stream.abort_now(Abort.SHUTDOWN)
        return len(streams)


def start_server(ae: ApplicationEntity, address: tuple[str, int], limits: Limits,
                 handlers: list[evt.EventHandlerType], ssl_context: ssl.SSLContext | None,
                 metrics: Metrics | None, reuse_port: bool = False) -> GuardedAssociationServer:
    """What ``AE.start_server(block=False)`` does, with :class:`GuardedAssociationServer`."""
    server = cast(GuardedAssociationServer, ae.make_server(
        address, ssl_context=ssl_context, evt_handlers=handlers,
        server_class=GuardedAssociationServer, limits=limits, metrics=metrics,
        reuse_port=reuse_port))
    thread = threading.Thread(target=server.serve_forever, name="AcceptorServer", daemon=True)
    thread.start()
    # As AE.start_server does; server.shutdown() removes it again.
    ae._servers.append(server)
    return server


def slots_check(server: ThreadedAssociationServer | None) -> Check:
    """/readyz's view of the receiver's slots (see GuardedAssociationServer.readiness)."""
    if isinstance(server, GuardedAssociationServer):
        return server.readiness()
    return Check(True, "not listening")

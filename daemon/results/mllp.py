"""MLLP (HL7 v2 Minimal Lower Layer Protocol, HL7 v2.5.1 Implementation Guide C.4): one
message framed as ``<VT> message <FS><CR>`` on a TCP (or TLS) connection, then one framed
acknowledgement back.

The whole exchange (connect, TLS handshake, send, acknowledgement) has one deadline. Network
errors are raised as :class:`OSError` (``ConnectionRefusedError``, ``TimeoutError`` while
connecting, :class:`ssl.SSLError`); after the message is sent, a missing answer is
:class:`NoAcknowledgement` and a closed connection :class:`ConnectionClosed`.
"""

from __future__ import annotations

import socket
import ssl
import time

from daemon.results.exceptions import ConnectionClosed, FramingError, NoAcknowledgement

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\r"
MAX_ACK_BYTES = 1 << 20
"""An acknowledgement is a few hundred bytes; a peer that sends more is not answering."""


def frame(message: bytes) -> bytes:
    """``message`` in an MLLP block."""
    return START_BLOCK + message + END_BLOCK


def exchange(host: str, port: int, message: bytes, timeout: float,
             tls: ssl.SSLContext | None = None) -> bytes:
    """Send one message and return the body of the acknowledgement frame (without framing).

    Raises :class:`OSError` for connection and TLS failures, :class:`NoAcknowledgement`,
    :class:`ConnectionClosed` or :class:`FramingError` once the message was sent."""
    deadline = time.monotonic() + timeout
    with socket.create_connection((host, port), timeout=timeout) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn: socket.socket = tls.wrap_socket(raw, server_hostname=host) if tls else raw
        try:
            conn.settimeout(max(0.001, deadline - time.monotonic()))
            conn.sendall(frame(message))
            return _read_frame(conn, deadline, timeout)
        except ConnectionError as e:  # reset or broken pipe once connected: not "unreachable"
            raise ConnectionClosed(f"the connection was lost ({type(e).__name__})") from e
        finally:
            if conn is not raw:
                conn.close()


def _read_frame(conn: socket.socket, deadline: float, timeout: float) -> bytes:
    buffer = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise NoAcknowledgement(f"no acknowledgement within {timeout:g} s")
        conn.settimeout(remaining)
        try:
            chunk = conn.recv(65536)
        except TimeoutError:
            raise NoAcknowledgement(f"no acknowledgement within {timeout:g} s") from None
        if not chunk:
            raise ConnectionClosed("the peer closed the connection without a complete "
                                   f"acknowledgement ({len(buffer)} bytes received)")
        buffer += chunk
        if not buffer.startswith(START_BLOCK):
            raise FramingError("the answer does not start with an MLLP start block (0x0B)")
        end = buffer.find(END_BLOCK)
        if end >= 0:
            return buffer[1:end]
        if len(buffer) > MAX_ACK_BYTES:
            raise FramingError(f"no end of block within {MAX_ACK_BYTES} bytes")

"""Deliver SRs to the configured destinations with C-STORE, retrying with backoff.

Runs as a scheduler job in `opacityd serve`. Four ways a PACS can let us down
are recorded as four different reasons: ``association_rejected`` (it
answered A-ASSOCIATE-RJ), ``tls_failed`` (the TLS handshake failed; the detail
is OpenSSL's reason, e.g. an unverifiable certificate), ``unreachable`` (no
answer, refused connection, abort), and ``failure_status`` (it answered the
C-STORE with a failure).
After ``delivery.max_attempts`` a delivery becomes FAILED and an alert-level
event is logged. The SR's SOP Instance UID is deterministic, so a re-send
after a crash is the same object and the PACS de-duplicates it.
"""

from __future__ import annotations

import random
import socket
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pydicom
import structlog
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from daemon.config import Config, DestinationConfig
from daemon.spool import Spool
from db import deliveries
from db.engine import unit_of_work
from db.states import DeliveryState

log = structlog.get_logger("opacityd.sender")
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"


@dataclass(frozen=True)
class Outcome:
    delivered: bool
    reason: str
    detail: str


def _tls(dest: DestinationConfig) -> tuple[ssl.SSLContext, str] | None:
    if not dest.tls.enabled:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                     cafile=dest.tls.ca_certificates or None)
    if dest.tls.certificate:
        ctx.load_cert_chain(dest.tls.certificate, dest.tls.private_key or None)
    return ctx, dest.host


def _tls_problem(dest: DestinationConfig, ctx: ssl.SSLContext, timeout: float) -> str | None:
    """Why a TLS connection to ``dest`` fails, or None when TLS itself works.

    pynetdicom logs a failed handshake and reports only "not established"; an operator needs
    OpenSSL's reason (unknown CA, host name mismatch, client certificate required, a plain
    port). So after a failed TLS association one bare handshake finds it. With TLS 1.3 a
    refused client certificate arrives as an alert after the handshake: read briefly for it.
    """
    where = f"TLS handshake with {dest.host}:{dest.port} failed"
    try:
        raw = socket.create_connection((dest.host, dest.port), timeout=timeout)
    except OSError:
        return None  # not a TLS problem (refused, unreachable): reported as unreachable
    try:
        with ctx.wrap_socket(raw, server_hostname=dest.host) as tls:
            tls.settimeout(min(timeout, 1.0))
            if tls.recv(1) == b"":
                return f"{where}: the destination closed the connection after the handshake"
    except TimeoutError:
        return None  # it waits for our A-ASSOCIATE-RQ: TLS is fine
    except ssl.SSLCertVerificationError as e:
        return f"{where}: {e.reason} ({e.verify_message})"
    except ssl.SSLError as e:
        return f"{where}: {e.reason or e}"
    except OSError as e:
        return f"{where}: {e.strerror or type(e).__name__} (is {dest.port} a TLS port?)"
    finally:
        raw.close()
    return None


def send_one(dest: DestinationConfig, sr: pydicom.Dataset, timeout: float) -> Outcome:
    """One C-STORE of ``sr`` to ``dest``; never raises for network trouble."""
    ae = AE(ae_title=dest.calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    ae.add_requested_context(COMPREHENSIVE_SR, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    tls = _tls(dest)
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.called_ae, tls_args=tls)
    if assoc.is_rejected:
        return Outcome(False, "association_rejected", "the destination rejected the association")
    if not assoc.is_established:
        problem = _tls_problem(dest, tls[0], timeout) if tls else None
        if problem:
            return Outcome(False, "tls_failed", problem)
        return Outcome(False, "unreachable", f"no association with {dest.host}:{dest.port}")
    try:
        status = assoc.send_c_store(sr)
    finally:
        if assoc.is_established:
            assoc.release()
    if not status or "Status" not in status:
        return Outcome(False, "unreachable", "no C-STORE response (connection lost)")
    code = int(status.Status)
    if code == 0x0000 or 0xB000 <= code <= 0xBFFF:
        return Outcome(True, "delivered", f"status 0x{code:04X}")
    comment = str(status.get("ErrorComment", "") or "")
    return Outcome(False, "failure_status", f"status 0x{code:04X} {comment}".strip())


def send_due(config: Config, sessions: sessionmaker[Session], spool: Spool) -> int:
    """Send every due delivery once; returns how many were delivered."""
    if not config.delivery.enabled:
        return 0
    destinations = {d.name: d for d in config.destinations}
    try:
        with unit_of_work(sessions) as session:
            due = deliveries.due(session, datetime.now(UTC))
    except SQLAlchemyError as e:
        log.warning("delivery_poll_failed", error=type(e).__name__)
        return 0
    sent = 0
    for item in due:
        dest = destinations.get(item.destination)
        with structlog.contextvars.bound_contextvars(study_uid=item.study_uid,
                                                     destination=item.destination):
            if dest is None or not dest.enabled:
                outcome = Outcome(False, "destination_not_configured",
                                  f"{item.destination} is not an enabled destination")
            else:
                try:
                    sr = pydicom.dcmread(spool.absolute(item.sr_path))
                except OSError as e:
                    outcome = Outcome(False, "sr_missing", f"{type(e).__name__}: {e}")
                else:
                    outcome = send_one(dest, sr, config.delivery.timeout_s)
            sent += _record(config, sessions, item, outcome)
    return sent


def _record(config: Config, sessions: sessionmaker[Session], item: deliveries.DueDelivery,
            outcome: Outcome) -> int:
    now = datetime.now(UTC)
    d = config.delivery
    retry_in = timedelta(seconds=min(d.retry_max_s, d.retry_base_s * 2 ** item.attempts)
                         * random.uniform(0.5, 1.5))
    with unit_of_work(sessions) as session:
        if outcome.delivered:
            deliveries.mark_delivered(session, item.delivery_id, now, outcome.detail)
            state = DeliveryState.DELIVERED
        else:
            state = deliveries.mark_failed_attempt(session, item.delivery_id, now, outcome.reason,
                                                   outcome.detail, d.max_attempts, retry_in)
    if state is DeliveryState.DELIVERED:
        log.info("sr_delivered", sr=item.sr_sop_instance_uid, attempt=item.attempts + 1,
                 seconds_since_received=round((now - item.received_at).total_seconds(), 2))
        return 1
    if state is DeliveryState.FAILED:
        log.critical("delivery_failed_alert", sr=item.sr_sop_instance_uid, reason=outcome.reason,
                     detail=outcome.detail, attempts=item.attempts + 1)
    else:
        log.warning("delivery_retry", reason=outcome.reason, detail=outcome.detail,
                    attempt=item.attempts + 1, retry_in_s=round(retry_in.total_seconds(), 1))
    return 0

"""Deliver SRs to the configured destinations with C-STORE, retrying with backoff.

Runs as a scheduler job in `opacityd serve`. Three ways a PACS can let us down
are recorded as three different reasons: ``association_rejected`` (it
answered A-ASSOCIATE-RJ), ``unreachable`` (no answer, refused connection,
abort), and ``failure_status`` (it answered the C-STORE with a failure).
After ``delivery.max_attempts`` a delivery becomes FAILED and an alert-level
event is logged. The SR's SOP Instance UID is deterministic, so a re-send
after a crash is the same object and the PACS de-duplicates it.
"""

from __future__ import annotations

import random
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


def send_one(dest: DestinationConfig, sr: pydicom.Dataset, timeout: float) -> Outcome:
    """One C-STORE of ``sr`` to ``dest``; never raises for network trouble."""
    ae = AE(ae_title=dest.calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    ae.add_requested_context(COMPREHENSIVE_SR, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.called_ae, tls_args=_tls(dest))
    if assoc.is_rejected:
        return Outcome(False, "association_rejected", "the destination rejected the association")
    if not assoc.is_established:
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

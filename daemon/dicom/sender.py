"""Deliver each result's objects: the SR by C-STORE to ``[[destinations]]``, the HL7 ORU^R01 by
MLLP to ``[[hl7_destinations]]``; each outcome is retried or final.

Runs as a scheduler job in `opacityd serve`. Every attempt ends in one
:class:`Outcome` whose reason (:class:`DeliveryReason`) says what happened.
Deliveries are claimed under a lease (:mod:`db.deliveries`), so several `serve`
processes on one database never send the same delivery at once.

Retried with ``config.delivery.retry`` (transient; after the last attempt the
delivery becomes FAILED with an alert):

- ``out_of_resources``: the PACS answered 0xA7xx.
- ``association_rejected_transient``: A-ASSOCIATE-RJ "rejected (transient)"
  (e.g. the PACS is at its association limit).
- ``unreachable``: refused connection, network error, no answer within
  ``delivery.timeout_s`` (the detail says which).
- ``connection_lost``: the association was aborted, or no C-STORE response
  came within the timeout.
- ``tls_failed``: the TLS handshake failed; the detail is OpenSSL's reason (an
  unverifiable certificate, a client certificate required, not a TLS port).
- ``internal_error``: an unexpected exception in this attempt (logged with its
  traceback).

Final at once (permanent: the same request would get the same answer), with
an alert-level event:

- ``association_rejected``: A-ASSOCIATE-RJ "rejected (permanent)" (AE title,
  allow-list).
- ``no_presentation_context``: the PACS accepted none of our Comprehensive SR
  contexts.
- ``sop_class_not_supported`` (0x0122), ``dataset_mismatch`` (0xA9xx),
  ``cannot_understand`` (0xCxxx), ``failure_status`` (any other failure status).
- ``sr_unreadable`` / ``summary_unreadable``: the SR (summary image) file is missing,
  unreadable, or not the object its result names.
- ``destination_not_configured``: the destination is no longer an enabled one, or its
  ``send`` no longer lists the delivery's kind.

HL7 (docs/conformance.md, section 6): ``unreachable`` and ``tls_failed`` as above;
``no_ack`` (no acknowledgement within ``delivery.timeout_s``), ``connection_lost``
(closed before a complete acknowledgement) and ``ack_unreadable`` (an answer that is
no HL7 acknowledgement, or acknowledges another message) are retried.
``ack_error`` (AE) and ``ack_rejected`` (AR) are final, their text kept on the row;
``no_accession_number`` and ``message_not_built`` are final too. Logs carry the
acknowledgement code and the message control ID, never the message or the RIS's text.

The detail of a C-STORE answer is its status and Error Comment; it is kept on
the delivery row, and logs carry only the status (an Error Comment is the
PACS's free text and may quote header values). After a fix, ``opacityd resend
STUDY_UID`` queues a failed delivery again. The SR's SOP Instance UID is
derived from its content, so a re-send after a crash is the same object and the
PACS de-duplicates it.
"""

from __future__ import annotations

import enum
import errno
import socket
import ssl
import struct
import traceback
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pydicom
import structlog
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, code_to_category
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from daemon.config import Config, DeliveryConfig, DestinationConfig, HL7DestinationConfig
from daemon.results import hl7, mllp
from daemon.results.exceptions import (
    AckUnreadable,
    ConnectionClosed,
    FramingError,
    MessageNotBuilt,
    NoAcknowledgement,
)
from daemon.results.report import COMPREHENSIVE_SR
from daemon.results.summary import SECONDARY_CAPTURE
from daemon.spool import Spool
from db import deliveries
from db.engine import read_only, unit_of_work
from db.states import DeliveryKind, DeliveryState

log = structlog.get_logger("opacityd.sender")

PROBE_TIMEOUT_S = 5.0
"""Longest wait of the bare connection that names why an association failed."""

ATTEMPT_LEASE_TIMEOUTS = 4
"""A claimed delivery is held for this many ``delivery.timeout_s`` (plus the probe) per
attempt: longer than one attempt can take (association, store, the probe that names why it
failed), so another sender never takes a delivery that is being sent; short enough that one
a crashed sender held is due again within minutes."""


def claim_lease(delivery: DeliveryConfig) -> timedelta:
    """How long a claim (and each attempt) keeps a delivery from other senders."""
    return timedelta(seconds=ATTEMPT_LEASE_TIMEOUTS * delivery.timeout_s + PROBE_TIMEOUT_S)


class DeliveryReason(enum.StrEnum):
    """``deliveries.last_reason``: what the last attempt of a delivery came to."""

    DELIVERED = "delivered"
    OUT_OF_RESOURCES = "out_of_resources"
    ASSOCIATION_REJECTED_TRANSIENT = "association_rejected_transient"
    UNREACHABLE = "unreachable"
    CONNECTION_LOST = "connection_lost"
    TLS_FAILED = "tls_failed"
    INTERNAL_ERROR = "internal_error"
    ASSOCIATION_REJECTED = "association_rejected"
    NO_PRESENTATION_CONTEXT = "no_presentation_context"
    SOP_CLASS_NOT_SUPPORTED = "sop_class_not_supported"
    DATASET_MISMATCH = "dataset_mismatch"
    CANNOT_UNDERSTAND = "cannot_understand"
    FAILURE_STATUS = "failure_status"
    SR_UNREADABLE = "sr_unreadable"
    SUMMARY_UNREADABLE = "summary_unreadable"
    DESTINATION_NOT_CONFIGURED = "destination_not_configured"
    NO_ACK = "no_ack"
    ACK_UNREADABLE = "ack_unreadable"
    ACK_ERROR = "ack_error"
    ACK_REJECTED = "ack_rejected"
    NO_ACCESSION_NUMBER = "no_accession_number"
    MESSAGE_NOT_BUILT = "message_not_built"


@dataclass(frozen=True)
class Outcome:
    """One attempt's result. ``transient``: a later attempt may succeed (retry with the
    policy); otherwise a failure is final at once. ``status``: the C-STORE status, if any."""

    delivered: bool
    reason: DeliveryReason
    detail: str
    transient: bool = False
    status: int | None = None
    public: str | None = None
    """What logs may say when the detail quotes the peer's free text (an HL7 error text)."""

    @property
    def log_detail(self) -> str:
        """The detail without the PACS's Error Comment or the RIS's error text (free text that
        may quote header values)."""
        if self.public is not None:
            return self.public
        return self.detail if self.status is None else f"status 0x{self.status:04X}"


def classify_status(code: int, comment: str = "") -> Outcome:
    """What a C-STORE response status means for the delivery: success and warnings are
    delivered, 0xA7xx (out of resources) is retried, every other failure is final."""
    detail = f"status 0x{code:04X} {comment}".strip()
    category = code_to_category(code)
    if category in (STATUS_SUCCESS, STATUS_WARNING):
        return Outcome(True, DeliveryReason.DELIVERED, detail, status=code)
    if 0xA700 <= code <= 0xA7FF:
        return Outcome(False, DeliveryReason.OUT_OF_RESOURCES, detail, transient=True, status=code)
    if code == 0x0122:
        reason = DeliveryReason.SOP_CLASS_NOT_SUPPORTED
    elif 0xA900 <= code <= 0xA9FF:
        reason = DeliveryReason.DATASET_MISMATCH
    elif 0xC000 <= code <= 0xCFFF:
        reason = DeliveryReason.CANNOT_UNDERSTAND
    else:
        reason = DeliveryReason.FAILURE_STATUS
    return Outcome(False, reason, detail, status=code)


def _tls(dest: DestinationConfig | HL7DestinationConfig) -> tuple[ssl.SSLContext, str] | None:
    if not dest.tls.enabled:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                     cafile=dest.tls.ca_certificates or None)
    if dest.tls.certificate:
        ctx.load_cert_chain(dest.tls.certificate, dest.tls.private_key or None)
    return ctx, dest.host


def _tls_problem(dest: DestinationConfig | HL7DestinationConfig, ctx: ssl.SSLContext,
                 timeout: float) -> str | None:
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


def _unreachable(dest: DestinationConfig | HL7DestinationConfig, timeout: float) -> Outcome:
    """No association and no answer: one bare connection says whether the port refused, the
    host did not answer, or it answered TCP but not the A-ASSOCIATE-RQ in time."""
    where = f"{dest.host}:{dest.port}"
    try:
        with socket.create_connection((dest.host, dest.port), timeout=min(timeout, PROBE_TIMEOUT_S)):
            pass
    except ConnectionRefusedError:
        detail = f"{where} refused the connection"
    except TimeoutError:
        detail = f"{where} did not answer the connection (timed out)"
    except OSError as e:
        name = errno.errorcode.get(e.errno, "") if e.errno is not None else ""
        detail = f"{where}: {e.strerror or type(e).__name__} {name}".strip()
    else:
        detail = (f"{where} accepted the connection but gave no association answer within "
                  f"{timeout:g} s, or aborted it")
    return Outcome(False, DeliveryReason.UNREACHABLE, detail, transient=True)


def _endpoint(item: deliveries.DueDelivery) -> tuple[bool, str]:
    """Which configured peer a delivery goes to: an HL7 destination, or a DICOM one (SR and
    summary image alike)."""
    return item.kind is DeliveryKind.HL7, item.destination


def _not_established(assoc: Association, dest: DestinationConfig,
                     tls: tuple[ssl.SSLContext, str] | None, timeout: float,
                     sop_class: str) -> Outcome:
    """Classify an association that was requested but not established."""
    answer = assoc.acceptor.primitive
    if assoc.is_rejected and answer is not None:
        detail = (f"A-ASSOCIATE-RJ from {dest.called_ae}@{dest.host}:{dest.port}: "
                  f"{answer.result_str}, source {answer.source_str}, reason {answer.reason_str}")
        if answer.result == 0x02:
            return Outcome(False, DeliveryReason.ASSOCIATION_REJECTED_TRANSIENT, detail,
                           transient=True)
        return Outcome(False, DeliveryReason.ASSOCIATION_REJECTED, detail)
    if answer is not None and answer.result == 0x00:
        # pynetdicom aborts an accepted association in which no context was accepted.
        return Outcome(False, DeliveryReason.NO_PRESENTATION_CONTEXT,
                       f"{dest.called_ae}@{dest.host}:{dest.port} accepted the association but "
                       f"no {UID(sop_class).name.removesuffix(' Storage')} presentation "
                       "context (Explicit or Implicit VR Little Endian)")
    problem = _tls_problem(dest, tls[0], timeout) if tls else None
    if problem:
        return Outcome(False, DeliveryReason.TLS_FAILED, problem, transient=True)
    return _unreachable(dest, timeout)


def send_one(dest: DestinationConfig, obj: pydicom.Dataset, timeout: float) -> Outcome:
    """One C-STORE of ``obj`` (the SR or the summary image) to ``dest``, classified; never
    raises for network trouble or for any answer of the destination."""
    ae = AE(ae_title=dest.calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    ae.add_requested_context(str(obj.SOPClassUID), [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    tls = _tls(dest)
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.called_ae, tls_args=tls)
    if not assoc.is_established:
        return _not_established(assoc, dest, tls, timeout, str(obj.SOPClassUID))
    try:
        status = assoc.send_c_store(obj)
    except ValueError as e:
        # pynetdicom finds no accepted context for the object's SOP class and transfer syntax.
        return Outcome(False, DeliveryReason.NO_PRESENTATION_CONTEXT,
                       f"no accepted presentation context for {obj.SOPClassUID} "
                       f"({type(e).__name__})")
    finally:
        if assoc.is_established:
            assoc.release()
    if not status or "Status" not in status:
        return Outcome(False, DeliveryReason.CONNECTION_LOST,
                       f"no C-STORE response within {timeout:g} s (association aborted or timed out)",
                       transient=True)
    return classify_status(int(status.Status), str(status.get("ErrorComment", "") or ""))


def _describe(exc: BaseException) -> str:
    """The exception's type (and errno name), never its message (it may quote header values)."""
    name = type(exc).__name__
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{name} {errno.errorcode.get(exc.errno, exc.errno)}"
    return name


def _frames(exc: BaseException) -> str:
    """The traceback's frames and exception types; messages are withheld (see :func:`_describe`)."""
    return "".join(traceback.format_tb(exc.__traceback__)) + f"{type(exc).__qualname__}: (withheld)"


_OBJECTS = {DeliveryKind.SR: ("SR", COMPREHENSIVE_SR, DeliveryReason.SR_UNREADABLE),
            DeliveryKind.SUMMARY: ("summary image", SECONDARY_CAPTURE,
                                   DeliveryReason.SUMMARY_UNREADABLE)}
"""Per DICOM delivery kind: what it is called, its SOP class, the reason when its file fails."""


def read_object(spool: Spool, item: deliveries.DueDelivery) -> pydicom.Dataset | Outcome:
    """The delivery's DICOM file (its SR or summary image), or an ``sr_unreadable`` /
    ``summary_unreadable`` outcome when it is missing, unreadable or not the object its result
    names."""
    what, expected_class, unreadable = _OBJECTS[item.kind]
    if not item.object_path:
        return Outcome(False, unreadable, f"the result has no {what}")
    path = spool.absolute(item.object_path)
    try:
        obj = pydicom.dcmread(path)
        found = str(obj.SOPInstanceUID)
        sop_class = str(obj.SOPClassUID)
    except (OSError, InvalidDicomError, EOFError, ValueError, struct.error, AttributeError,
            KeyError) as e:
        return Outcome(False, unreadable,
                       f"{what} file {item.object_path} could not be read ({_describe(e)})")
    if found != item.object_uid or sop_class != expected_class:
        return Outcome(False, unreadable,
                       f"{what} file {item.object_path} holds another object ({sop_class} {found})")
    return obj


def attempt(config: Config, spool: Spool, item: deliveries.DueDelivery,
            sessions: sessionmaker[Session] | None = None) -> Outcome:
    """One attempt of one delivery: its destination, its SR or summary file, the C-STORE; or
    for an HL7 delivery (``sessions`` needed), its message, the MLLP exchange."""
    if item.kind is DeliveryKind.HL7:
        if sessions is None:
            raise ValueError("an HL7 delivery is attempted with the database sessions")
        return attempt_hl7(config, sessions, item)
    dest = next((d for d in config.destinations if d.name == item.destination), None)
    if dest is None or not dest.enabled or item.kind.value not in dest.send:
        return Outcome(False, DeliveryReason.DESTINATION_NOT_CONFIGURED,
                       f"{item.destination} is not an enabled destination for {item.kind.value}")
    obj = read_object(spool, item)
    if isinstance(obj, Outcome):
        return obj
    return send_one(dest, obj, config.delivery.timeout_s)


def attempt_hl7(config: Config, sessions: sessionmaker[Session],
                item: deliveries.DueDelivery) -> Outcome:
    """One attempt of one HL7 delivery: build the ORU^R01, send it, read the acknowledgement."""
    dest = next((d for d in config.hl7_destinations if d.name == item.destination), None)
    if dest is None or not dest.enabled:
        return Outcome(False, DeliveryReason.DESTINATION_NOT_CONFIGURED,
                       f"{item.destination} is not an enabled HL7 destination")
    with read_only(sessions) as session:
        content = deliveries.result_message(session, item.delivery_id)
    if not (content.accession_number or "").strip():
        return Outcome(False, DeliveryReason.NO_ACCESSION_NUMBER,
                       "the study has no accession number: the RIS could not match the result")
    try:
        payload = hl7.encode(hl7.build_oru(content, dest, datetime.now(UTC)))
    except MessageNotBuilt as e:
        return Outcome(False, DeliveryReason.MESSAGE_NOT_BUILT, str(e))
    return send_hl7(dest, payload, content.message_control_id, config.delivery.timeout_s)


def send_hl7(dest: HL7DestinationConfig, payload: bytes, control_id: str,
             timeout: float) -> Outcome:
    """One MLLP exchange of ``payload`` with ``dest``, classified by its acknowledgement;
    never raises for network trouble or for any answer of the destination."""
    where = f"{dest.host}:{dest.port}"
    tls = _tls(dest)
    try:
        body = mllp.exchange(dest.host, dest.port, payload, timeout, tls[0] if tls else None)
    except NoAcknowledgement as e:
        return Outcome(False, DeliveryReason.NO_ACK, f"{where}: {e}", transient=True)
    except (ConnectionClosed, FramingError) as e:
        reason = (DeliveryReason.CONNECTION_LOST if isinstance(e, ConnectionClosed)
                  else DeliveryReason.ACK_UNREADABLE)
        return Outcome(False, reason, f"{where}: {e}", transient=True)
    except ssl.SSLError as e:
        return Outcome(False, DeliveryReason.TLS_FAILED,
                       f"TLS handshake with {where} failed: {e.reason or type(e).__name__}",
                       transient=True)
    except OSError:
        return _unreachable(dest, timeout)
    try:
        ack = hl7.parse_ack(body)
    except AckUnreadable as e:
        return Outcome(False, DeliveryReason.ACK_UNREADABLE, f"{where}: {e}", transient=True)
    if ack.control_id != control_id:
        return Outcome(False, DeliveryReason.ACK_UNREADABLE,
                       f"{where} acknowledged message {ack.control_id!r}, not {control_id!r}",
                       transient=True)
    if ack.accepted:
        return Outcome(True, DeliveryReason.DELIVERED, f"{ack.code} {ack.text}".strip(),
                       public=ack.code)
    reason = DeliveryReason.ACK_REJECTED if ack.rejected else DeliveryReason.ACK_ERROR
    return Outcome(False, reason, f"{ack.code} {ack.text}".strip(), public=ack.code)


_DESTINATION_DOWN = frozenset({DeliveryReason.UNREACHABLE, DeliveryReason.TLS_FAILED,
                               DeliveryReason.ASSOCIATION_REJECTED_TRANSIENT,
                               DeliveryReason.NO_ACK})
"""Outcomes that say nothing about the SR but that the destination cannot take one now."""


def send_due(config: Config, sessions: sessionmaker[Session], spool: Spool) -> int:
    """Claim the due deliveries and attempt each once; returns how many were delivered.

    Each delivery has its own fault boundary: whatever goes wrong with one (its SR file, its
    message, its destination, a bug) is logged and recorded on that delivery, and the loop goes
    on. Once a destination is down in this pass, its other deliveries are given back for the
    next pass instead of each waiting out the timeout. Shadow mode sends nothing."""
    if not config.delivery.enabled:
        return 0
    lease = claim_lease(config.delivery)
    try:
        with read_only(sessions) as session:
            if not deliveries.any_due(session, datetime.now(UTC)):
                return 0
        with unit_of_work(sessions) as session:
            due = deliveries.due(session, datetime.now(UTC), lease=lease)
    except SQLAlchemyError as e:
        log.warning("delivery_poll_failed", error=_describe(e))
        return 0
    sent = 0
    down: set[tuple[bool, str]] = set()
    """Endpoints found down in this pass, as (is an HL7 destination, its name): an SR and a
    summary image go to the same [[destinations]] entry."""
    deferred: list[deliveries.DueDelivery] = []
    for item in due:
        with structlog.contextvars.bound_contextvars(study_uid=item.study_uid,
                                                     destination=item.destination,
                                                     kind=item.kind.value,
                                                     delivery_id=item.delivery_id):
            if _endpoint(item) in down:
                log.info("delivery_deferred", reason="destination_down_in_this_pass")
                deferred.append(item)
                continue
            sent += _attempt_claimed(config, sessions, spool, item, lease, down)
    if deferred:
        try:
            with unit_of_work(sessions) as session:
                deliveries.release(session, deferred, datetime.now(UTC))
        except SQLAlchemyError as e:  # they become due when their claim lapses
            log.warning("delivery_release_failed", error=_describe(e), deliveries=len(deferred))
    return sent


def _attempt_claimed(config: Config, sessions: sessionmaker[Session], spool: Spool,
                     item: deliveries.DueDelivery, lease: timedelta,
                     down: set[tuple[bool, str]]) -> int:
    """Renew the claim, attempt, record; returns 1 when delivered."""
    try:
        with unit_of_work(sessions) as session:
            claimed = deliveries.start_attempt(session, item, datetime.now(UTC), lease)
    except SQLAlchemyError as e:  # not attempted: due again when the claim lapses
        log.warning("delivery_claim_failed", error=_describe(e))
        return 0
    if claimed is None:
        log.info("delivery_claim_lapsed")
        return 0
    try:
        outcome = attempt(config, spool, claimed, sessions)
    except Exception as e:  # noqa: BLE001 - this delivery's boundary: record it, go on
        log.error("delivery_attempt_crashed", error=_describe(e), exception=_frames(e))
        outcome = Outcome(False, DeliveryReason.INTERNAL_ERROR,
                          f"unexpected error in the attempt ({_describe(e)})", transient=True)
    if outcome.reason in _DESTINATION_DOWN:
        down.add(_endpoint(claimed))
    try:
        return _record(config, sessions, claimed, outcome)
    except Exception as e:  # noqa: BLE001 - the recording's boundary: not recorded, due again when the claim lapses
        log.error("delivery_not_recorded", reason=outcome.reason.value, error=_describe(e),
                  exception=_frames(e))
        return 0


def _record(config: Config, sessions: sessionmaker[Session], item: deliveries.DueDelivery,
            outcome: Outcome) -> int:
    """Record ``outcome`` on the delivery and log it; returns 1 when it was delivered."""
    now = datetime.now(UTC)
    policy = config.delivery.retry
    attempt_no = item.attempts + 1
    retry_in = (policy.delay(attempt_no)
                if outcome.transient and not policy.exhausted(attempt_no) else None)
    with unit_of_work(sessions) as session:
        if outcome.delivered:
            deliveries.mark_delivered(session, item.delivery_id, now, outcome.detail)
            state = DeliveryState.DELIVERED
        else:
            state = deliveries.mark_failed_attempt(session, item.delivery_id, now, outcome.reason,
                                                   outcome.detail, retry_in)
    # What was sent: the SR's or summary's UID, or the HL7 message's control ID (never the message itself).
    sent_object = ({"message_control_id": item.message_control_id}
                   if item.kind is DeliveryKind.HL7 else {item.kind.value: item.object_uid})
    if state is DeliveryState.DELIVERED:
        log.info(f"{item.kind.value}_delivered",
                 **sent_object, attempt=attempt_no, detail=outcome.log_detail,
                 seconds_since_received=round((now - item.received_at).total_seconds(), 2))
        return 1
    if state is DeliveryState.FAILED:
        log.critical("delivery_failed_alert", **sent_object,
                     reason=outcome.reason.value, detail=outcome.log_detail, attempts=attempt_no,
                     final="permanent" if not outcome.transient else "attempts_exhausted")
    else:
        log.warning("delivery_retry", **sent_object, reason=outcome.reason.value,
                    detail=outcome.log_detail,
                    attempt=attempt_no, retry_in_s=round(retry_in.total_seconds(), 1)
                    if retry_in is not None else None)
    return 0

"""The DICOM Storage SCP: accept, write durably, record, then acknowledge.

The C-STORE handler is thin. It never decodes pixels and never runs the
model. pynetdicom writes the data set into the spool as it arrives
(:mod:`daemon.dicom.incoming`); the handler parses the header (pixel data
skipped), fsyncs the file, and hands the record to the process's writer thread
(:mod:`daemon.dicom.group_commit`), which in one transaction for all waiting
records lets the database decide NEW or DUPLICATE (by SOP Instance UID and the
sha256 of the data set), links a kept file under a name nobody holds (fsync of
the folder) and records the rows; only after that commit does the handler
answer 0x0000. An acknowledged file is never replaced or removed
by a later association (``receiver.duplicate_policy``, docs/conformance.md).
Each expected failure is a specific status (see :mod:`daemon.dicom.statuses`) with an
Error Comment and a logged reason.
"""

from __future__ import annotations

import ssl
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import structlog
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    UID,
    ComputedRadiographyImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
)
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.presentation import StoragePresentationContexts
from pynetdicom.service_class import ServiceClass, StorageServiceClass
from pynetdicom.sop_class import register_uid, uid_to_service_class
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from daemon.config import Config
from daemon.dicom.access import REJECTED_PERMANENT, SOURCE_SERVICE_USER, AccessPolicy
from daemon.dicom.eligibility import classify
from daemon.dicom.group_commit import CommitRefused, GroupCommitter
from daemon.dicom.incoming import IncomingFile, incoming_folder, read_header, receive_into
from daemon.dicom.statuses import StoreStatus, status_dataset
from daemon.dicom.transport import GuardedAssociationServer, Limits, start_server
from daemon.disk import DiskGuard
from daemon.exceptions import SpoolError
from daemon.spool import SPOOL_FULL_ERRNOS, Spool, is_valid_uid
from daemon.web.metrics import Metrics
from db import queue
from db.engine import unit_of_work

log = structlog.get_logger("opacityd.receiver")

CHEST_STORAGE_CLASSES = (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
)
TRANSFER_SYNTAXES = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)
VERIFICATION = UID("1.2.840.10008.1.1")
_IDENTIFYING = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Refusal(Exception):
    status: StoreStatus
    reason: str
    comment: str
    study_uid: str | None = None
    sop_instance_uid: str | None = None


def _tls_context(config: Config) -> ssl.SSLContext | None:
    tls = config.receiver.tls
    if not tls.enabled:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(tls.certificate, tls.private_key)
    if tls.ca_certificates:
        ctx.load_verify_locations(tls.ca_certificates)
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_OPTIONAL
    return ctx


def _identify(ds: Dataset, requested_sop_class: str, requested_sop_instance: str) -> dict[str, str]:
    """The identifying UIDs, or a :class:`Refusal` saying which one is wrong.

    The C-STORE request's Affected SOP Class and SOP Instance UIDs must be the data set's
    (PS3.4 B.2.3): a mismatch is answered 0xA900, since storing it would file the instance
    under an identity its sender did not announce."""
    values = {k: str(ds.get(k, "") or "").strip() for k in _IDENTIFYING}
    study_uid = values["StudyInstanceUID"] or None
    sop_uid = values["SOPInstanceUID"] or None
    for keyword, value in values.items():
        if not value:
            raise Refusal(StoreStatus.MISSING_UID, "missing_uid", f"missing {keyword}",
                          study_uid if is_valid_uid(study_uid or "") else None, None)
    for keyword, value in values.items():
        if not is_valid_uid(value):
            raise Refusal(StoreStatus.INVALID_UID, "invalid_uid", f"invalid {keyword}",
                          study_uid if is_valid_uid(values["StudyInstanceUID"]) else None, None)
    if values["SOPClassUID"] != requested_sop_class:
        raise Refusal(StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS, "sop_class_mismatch",
                      "SOP Class UID differs from the presentation context", study_uid, sop_uid)
    if requested_sop_instance and values["SOPInstanceUID"] != requested_sop_instance:
        raise Refusal(StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS, "sop_instance_mismatch",
                      "SOP Instance UID differs from the request's Affected SOP Instance UID",
                      study_uid, sop_uid)
    return values


def _write_refusal(e: OSError, study_uid: str | None = None, sop_uid: str | None = None
                   ) -> Refusal:
    """0xA700 for a received file that could not be written or fsynced."""
    if e.errno in SPOOL_FULL_ERRNOS:
        return Refusal(StoreStatus.OUT_OF_RESOURCES, "spool_full", "out of disk space",
                       study_uid, sop_uid)
    return Refusal(StoreStatus.OUT_OF_RESOURCES, "spool_error",
                   f"cannot write spool file: {e.strerror}", study_uid, sop_uid)


def _register_storage_class(sop_class: str) -> None:
    """Make pynetdicom treat a configured private or unknown SOP class as a storage class.

    Without this it accepts the presentation context and then aborts the association at the
    first C-STORE ("No supported service class available")."""
    if uid_to_service_class(sop_class) is ServiceClass:
        register_uid(sop_class, f"OpacitydStorage_{sop_class.replace('.', '_')}",
                     StorageServiceClass)


class Receiver:
    """The Storage SCP. ``start()`` listens in background threads; ``stop()`` drains."""

    def __init__(self, config: Config, sessions: sessionmaker[Session], spool: Spool,
                 disk: DiskGuard | None = None, metrics: Metrics | None = None) -> None:
        self.config = config
        self.sessions = sessions
        self.spool = spool
        self.disk = disk
        self.metrics = metrics
        self.policy = AccessPolicy(config.receiver.ae_title, config.receiver.peers)
        self.server: GuardedAssociationServer | None = None
        self.committer: GroupCommitter | None = None
        self._assoc_ids: weakref.WeakKeyDictionary[Association, str] = weakref.WeakKeyDictionary()
        self._ids_lock = threading.Lock()
        self.ae = self._build_ae()
        self.incoming = receive_into(self.ae, incoming_folder(spool.root))

    def _build_ae(self) -> AE:
        r = self.config.receiver
        ae = AE(ae_title=r.ae_title)
        ae.maximum_associations = r.max_associations
        ae.maximum_pdu_size = r.max_pdu_size
        ae.acse_timeout = r.acse_timeout_s
        ae.dimse_timeout = r.dimse_timeout_s
        ae.network_timeout = r.network_timeout_s
        ae.add_supported_context(VERIFICATION)
        syntaxes = list(TRANSFER_SYNTAXES)
        if r.accept_any_storage_class:
            for cx in StoragePresentationContexts:
                if cx.abstract_syntax is not None:
                    ae.add_supported_context(cx.abstract_syntax, syntaxes)
        else:
            for sop_class in (*CHEST_STORAGE_CLASSES, *r.extra_sop_classes):
                _register_storage_class(sop_class)
                ae.add_supported_context(sop_class, syntaxes)
        return ae

    @property
    def handlers(self) -> list[evt.EventHandlerType]:
        return [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
        ]

    def start(self) -> None:
        """Mark the spool root (workers elsewhere check the mark) and listen.
        Raises SpoolError when the spool cannot be written, OSError when the port is taken."""
        r = self.config.receiver
        if self.spool.mark():
            log.info("spool_marked", root=str(self.spool.root))
        try:
            self.incoming.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SpoolError(f"cannot make {self.incoming.folder}: {e.strerror}") from e
        self.committer = GroupCommitter(self.sessions, self.spool, r.duplicate_policy)
        self.server = start_server(self.ae, (r.bind_address, r.port), Limits.from_config(r),
                                   self.handlers, _tls_context(self.config), self.metrics,
                                   reuse_port=r.processes > 1)
        log.info("receiver_listening", ae_title=r.ae_title, address=r.bind_address, port=self.port,
                 tls=r.tls.enabled, max_associations=r.max_associations,
                 max_pdu_size=r.max_pdu_size)

    @property
    def port(self) -> int:
        if self.server is None:
            return self.config.receiver.port
        return int(self.server.server_address[1])

    def stop(self, grace_s: float) -> int:
        """Stop accepting, let in-flight associations finish for up to ``grace_s``.

        Returns how many associations had to be aborted when the grace ran out.
        """
        if self.server is not None:
            self.server.shutdown()
        deadline = time.monotonic() + grace_s
        while self._active() and time.monotonic() < deadline:
            time.sleep(0.05)
        leftover = self._active()
        if leftover and self.server is not None:
            # Ends reads blocked on a stalled peer, so the aborts below cannot hang.
            self.server.abort_associations()
        for assoc in leftover:
            assoc.abort()
        if self.committer is not None:
            self.committer.stop()
            self.committer = None
        log.info("receiver_stopped", aborted_associations=len(leftover))
        return len(leftover)

    def _active(self) -> list[Association]:
        return [a for a in self.ae.active_associations if a.is_acceptor]

    def _assoc_id(self, assoc: Association) -> str:
        with self._ids_lock:
            found = self._assoc_ids.get(assoc)
            if found is None:
                found = uuid.uuid4().hex[:12]
                self._assoc_ids[assoc] = found
            return found

    def _on_requested(self, event: Event) -> None:
        rq = event.assoc.requestor
        primitive = rq.primitive
        calling = str(primitive.calling_ae_title).strip() if primitive else ""
        called = str(primitive.called_ae_title).strip() if primitive else ""
        address = str(rq.address)
        reason = self.policy.decide(calling, called, address)
        if reason is None:
            log.info("association_requested", assoc_id=self._assoc_id(event.assoc),
                     calling_ae=calling, address=address)
            return
        log.warning("association_rejected", calling_ae=calling, called_ae=called, address=address,
                    reason=reason.label)
        if self.metrics is not None:
            self.metrics.rejected.labels(reason.label).inc()
        try:
            with unit_of_work(self.sessions) as session:
                queue.record_association_rejected(session, calling or "?", address,
                                                  reason.label, utcnow())
        except SQLAlchemyError as e:
            log.error("audit_write_failed", error=type(e).__name__)
        event.assoc.acse.send_reject(REJECTED_PERMANENT, SOURCE_SERVICE_USER, reason.diagnostic)
        # As pynetdicom's own rejections do: wait until the DUL has sent the A-ASSOCIATE-RJ,
        # or the socket may close first and the peer sees only an abort.
        event.assoc.kill()

    def _on_echo(self, event: Event) -> int:
        log.info("echo", assoc_id=self._assoc_id(event.assoc),
                 calling_ae=event.assoc.requestor.ae_title)
        return 0x0000

    def _on_closed(self, event: Event) -> None:
        abandoned = self.incoming.abandon(event.assoc)
        if abandoned:
            log.warning("incoming_files_abandoned", assoc_id=self._assoc_id(event.assoc),
                        count=abandoned)
        if event.assoc.is_established or event.assoc.is_released or event.assoc.is_aborted:
            log.info("association_closed", assoc_id=self._assoc_id(event.assoc),
                     released=event.assoc.is_released, aborted=event.assoc.is_aborted)

    def _on_store(self, event: Event) -> Dataset:
        started = time.perf_counter()
        calling = str(event.assoc.requestor.ae_title).strip()
        with structlog.contextvars.bound_contextvars(assoc_id=self._assoc_id(event.assoc),
                                                     calling_ae=calling):
            try:
                return self._store(event, calling, started)
            except Refusal as refusal:
                return self._refuse(refusal, calling)
            finally:
                structlog.contextvars.unbind_contextvars("study_uid")

    def _store(self, event: Event, calling: str, started: float) -> Dataset:
        request_class = str(event.request.AffectedSOPClassUID)
        incoming = self.incoming.take(event.dataset_path)
        if incoming is None:  # pynetdicom did not use our file: an installation error, not input
            raise Refusal(StoreStatus.OUT_OF_RESOURCES, "spool_error",
                          "the data set was not received into the spool")
        try:
            return self._store_received(event, calling, started, request_class, incoming)
        finally:
            incoming.discard()  # drops the temporary name; a placed link keeps the file

    def _store_received(self, event: Event, calling: str, started: float, request_class: str,
                        incoming: IncomingFile) -> Dataset:
        if incoming.error is not None:
            raise _write_refusal(incoming.error)
        try:
            ds = read_header(incoming.path)
            uids = _identify(ds, request_class, str(
                getattr(event.request, "AffectedSOPInstanceUID", "") or "").strip())
        except Refusal:
            raise
        except Exception as e:  # noqa: BLE001 - pydicom raises many types on malformed input
            raise Refusal(StoreStatus.CANNOT_UNDERSTAND, "malformed_dataset",
                          f"cannot parse data set ({type(e).__name__})") from e
        study_uid, sop_uid = uids["StudyInstanceUID"], uids["SOPInstanceUID"]
        structlog.contextvars.bind_contextvars(study_uid=study_uid)
        if self.disk is not None and self.disk.low():
            raise Refusal(StoreStatus.OUT_OF_RESOURCES, "disk_below_watermark",
                          "spool disk below its free-space watermark", study_uid, sop_uid)
        try:
            verdict = classify(ds, self.config.eligibility)
            accession = str(ds.get("AccessionNumber", "") or "").strip()[:16] or None
            header = {k: (str(ds.get(k, "") or "").strip() or None)
                      for k in ("Modality", "BodyPartExamined", "ViewPosition")}
        except Exception as e:  # noqa: BLE001 - a malformed header element
            raise Refusal(StoreStatus.CANNOT_UNDERSTAND, "malformed_dataset",
                          f"cannot parse header ({type(e).__name__})", study_uid, sop_uid) from e

        keep = verdict.eligible or self.config.receiver.ineligible_instances == "keep"
        temp = self._sync(incoming, study_uid, sop_uid) if keep else None
        record = queue.InstanceRecord(
            study_uid=study_uid, series_uid=uids["SeriesInstanceUID"], sop_instance_uid=sop_uid,
            sop_class_uid=uids["SOPClassUID"],
            transfer_syntax_uid=str(event.context.transfer_syntax),
            modality=(header["Modality"] or "")[:16] or None,
            body_part=(header["BodyPartExamined"] or "")[:64] or None,
            view_position=(header["ViewPosition"] or "")[:16] or None,
            accession_number=accession, eligible=verdict.eligible,
            eligibility_reason=verdict.reason.value, spool_path=None,
            size_bytes=incoming.body_bytes, calling_ae=calling,
            content_hash=incoming.hexdigest(),
        )
        stored = self._record(record, temp)
        policy = self.config.receiver.duplicate_policy
        if stored.outcome in (queue.StoreOutcome.CONFLICT_KEPT_FIRST,
                              queue.StoreOutcome.NEW_VERSION):
            log.warning("instance_conflict", sop_instance_uid=sop_uid, policy=policy,
                        held_hash=(stored.held_hash or "")[:queue.HASH_PREFIX],
                        received_hash=(record.content_hash or "")[:queue.HASH_PREFIX],
                        version=stored.version, reopened=stored.reopened)
            if self.metrics is not None:
                self.metrics.duplicate_conflicts.labels(policy).inc()
        log.info("instance_stored", sop_instance_uid=sop_uid, outcome=stored.outcome.value,
                 version=stored.version, eligible=verdict.eligible, reason=verdict.reason.value,
                 kept=stored.spool_path is not None, reopened=stored.reopened, bytes=incoming.body_bytes,
                 ms=round((time.perf_counter() - started) * 1000, 1))
        if self.metrics is not None:
            self.metrics.received.labels(str(verdict.eligible).lower(), verdict.reason.value).inc()
        return status_dataset(StoreStatus.SUCCESS)

    @staticmethod
    def _sync(incoming: IncomingFile, study_uid: str, sop_uid: str) -> Path:
        """The received file made durable (fsync), or a 0xA700 Refusal."""
        try:
            incoming.sync()
        except OSError as e:
            raise _write_refusal(e, study_uid, sop_uid) from e
        return incoming.path

    def _record(self, record: queue.InstanceRecord, temp: Path | None) -> queue.Stored:
        """Record the instance in the writer's next commit (placing ``temp`` if kept); a
        0xA700 :class:`Refusal` when the database or the spool fails."""
        if self.committer is None:
            raise Refusal(StoreStatus.OUT_OF_RESOURCES, "shutting_down", "the receiver is stopping",
                          record.study_uid, record.sop_instance_uid)
        try:
            return self.committer.record(record, temp)
        except CommitRefused as e:
            raise Refusal(e.status, e.reason, e.comment, record.study_uid,
                          record.sop_instance_uid) from e

    def _refuse(self, refusal: Refusal, calling: str) -> Dataset:
        log.warning("instance_refused", status=f"0x{int(refusal.status):04X}",
                    reason=refusal.reason, detail=refusal.comment,
                    study_uid=refusal.study_uid, sop_instance_uid=refusal.sop_instance_uid)
        if self.metrics is not None:
            self.metrics.refused.labels(refusal.reason).inc()
        if refusal.reason != "database_error":
            try:
                with unit_of_work(self.sessions) as session:
                    queue.record_refusal(session, calling, utcnow(), refusal.reason,
                                         int(refusal.status), refusal.study_uid,
                                         refusal.sop_instance_uid)
            except SQLAlchemyError as e:
                log.error("audit_write_failed", error=type(e).__name__)
        return status_dataset(refusal.status, refusal.comment)

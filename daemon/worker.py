"""`opacityd worker`: claim jobs, score their eligible images, write the SR, record the result.

A separate process from the receiver. The model is loaded once; jobs are
claimed in batches under a lease; images of all claimed jobs are decoded and
preprocessed in a thread pool while the network runs, and predicted in
batches. A study's probability is the maximum over its scored frontal images.
A study whose images all fail preprocessing gets a "not analysable" result
and SR listing the reasons. First SIGTERM finishes the current batch; a
second exits at once.
"""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType

import numpy as np
import pydicom
import structlog
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from daemon.config import Config
from daemon.health import ready_marker
from daemon.report import (
    ImageOutcome,
    build_sr,
    priority_for,
    sr_instance_uid,
    study_probability,
    with_threshold_overrides,
)
from daemon.spool import Spool
from db import jobs
from db.engine import create_db_engine, make_session_factory, unit_of_work
from model.errors import BundleError, PreprocessError
from model.predictor import Predictor
from model.preprocess import PreprocessSpec, preprocess, read_dicom

log = structlog.get_logger("opacityd.worker")


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class _Image:
    job: jobs.ClaimedJob
    sop_uid: str
    path: Path
    header: pydicom.Dataset | None = None
    array: np.ndarray | None = None
    refusal: str | None = None
    probability: float | None = None
    inference_s: float = 0.0
    """This image's share of its batch's network time."""


class Worker:
    def __init__(self, config: Config, sessions: sessionmaker[Session], predictor: Predictor,
                 spool: Spool, owner: str | None = None) -> None:
        self.config = config
        self.sessions = sessions
        self.predictor = predictor
        self.manifest = with_threshold_overrides(predictor.manifest, config.model)
        self.spool = spool
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"
        self.lease = timedelta(seconds=config.worker.lease_s)
        self.pool = ThreadPoolExecutor(config.worker.threads, thread_name_prefix="preprocess")
        enabled = [d.name for d in config.destinations if d.enabled]
        self.destinations = enabled if config.delivery.enabled else []

    def run(self, stop: threading.Event) -> None:
        log.info("worker_started", owner=self.owner, model=self.manifest.label,
                 thresholds=dataclasses.asdict(self.manifest.thresholds),
                 device=self.predictor.device, destinations=self.destinations,
                 shadow_mode=not self.config.delivery.enabled)
        while not stop.is_set():
            if not self.run_once():
                stop.wait(self.config.worker.poll_interval_s)
        self.pool.shutdown(wait=True)
        log.info("worker_stopped", owner=self.owner)

    def run_once(self) -> int:
        """Claim and process one batch of jobs; returns how many were claimed."""
        try:
            with unit_of_work(self.sessions) as session:
                claimed = jobs.claim_jobs(session, self.owner, self.lease, utcnow(),
                                          self.config.worker.batch_size)
        except SQLAlchemyError as e:
            log.warning("claim_failed", error=type(e).__name__)
            return 0
        if claimed:
            self._process(claimed)
        return len(claimed)

    def _process(self, claimed: list[jobs.ClaimedJob]) -> None:
        images: list[_Image] = []
        inputs: dict[int, list[jobs.JobInput]] = {}
        with unit_of_work(self.sessions) as session:
            for job in claimed:
                inputs[job.job_id] = jobs.job_inputs(session, job.study_id)
        for job in claimed:
            images += [_Image(job, item.sop_instance_uid, self.spool.absolute(item.spool_path))
                       for item in inputs[job.job_id] if item.eligible and item.spool_path]
        spec = self.predictor.manifest.preprocessing
        prepared = self.pool.map(lambda im: _prepare(im.path, spec), images)
        for img, (header, array, refusal) in zip(images, prepared, strict=True):
            img.header, img.array, img.refusal = header, array, refusal
        ready = [img for img in images if img.array is not None]
        batch_size = self.config.worker.batch_size
        for start in range(0, len(ready), batch_size):
            chunk = ready[start:start + batch_size]
            started = time.perf_counter()
            try:
                probabilities = self.predictor.predict(
                    np.stack([img.array for img in chunk if img.array is not None]))
            except (MemoryError, RuntimeError) as e:
                for job in {img.job.job_id: img.job for img in chunk}.values():
                    self._fail(job, f"inference failed: {type(e).__name__}: {e}", transient=True)
                return
            share = (time.perf_counter() - started) / len(chunk)
            for img, p in zip(chunk, probabilities, strict=True):
                img.probability = float(p)
                img.inference_s = share
                img.array = None
        for job in claimed:
            self._finish(job, inputs[job.job_id], [img for img in images if img.job is job])

    def _finish(self, job: jobs.ClaimedJob, items: list[jobs.JobInput], images: list[_Image]) -> None:
        with structlog.contextvars.bound_contextvars(study_uid=job.study_uid, job_id=job.job_id):
            try:
                self._record(job, items, images)
            except OperationalError as e:
                self._fail(job, f"database: {e}"[:300], transient=True)
            except (OSError, ValueError, KeyError) as e:
                self._fail(job, f"{type(e).__name__}: {e}"[:300], transient=False)

    def _record(self, job: jobs.ClaimedJob, items: list[jobs.JobInput], images: list[_Image]) -> None:
        manifest = self.manifest
        outcomes = [ImageOutcome(img.header, img.probability, img.refusal)
                    for img in images if img.header is not None]
        unreadable = [f"{img.sop_uid} ({img.refusal})" for img in images if img.header is None]
        if unreadable:
            # The spool lost an acknowledged instance: an operator must look; requeue after.
            self._fail(job, f"spooled instances unreadable: {', '.join(unreadable)}"[:1000],
                       transient=False)
            return
        if not outcomes:
            self._fail(job, "no eligible image is held for this study", transient=False)
            return
        study_p = study_probability(outcomes)
        scored = [str(o.header.SOPInstanceUID) for o in outcomes if o.probability is not None]
        with unit_of_work(self.sessions) as session:
            previous = jobs.latest_result(session, job.study_id)
            previous_path = previous.sr_path if previous is not None else None
            previous_uid = previous.sr_sop_instance_uid if previous is not None else None
        previous_sr = None
        # The same scored images and model give the same SR: it supersedes nothing.
        if (previous_path and previous_uid != sr_instance_uid(job.study_uid, scored, manifest)
                and self.spool.absolute(previous_path).exists()):
            previous_sr = pydicom.dcmread(self.spool.absolute(previous_path))
        sr = build_sr(job.study_uid, outcomes, manifest, revision=job.revision, previous=previous_sr)
        relative = f"sr/{job.study_uid}/{sr.SOPInstanceUID}.dcm"
        buffer = pydicom.filebase.DicomBytesIO()
        sr.save_as(buffer, enforce_file_format=True)
        self.spool.write(relative, [buffer.getvalue()])
        priority = priority_for(study_p, manifest)
        record = jobs.ResultRecord(
            model_name=manifest.name, model_version=manifest.version,
            model_validated=manifest.validated, probability=study_p,
            decision=None if study_p is None else study_p >= manifest.thresholds.decision,
            threshold=manifest.thresholds.decision, urgent_threshold=manifest.thresholds.urgent,
            elevated_threshold=manifest.thresholds.elevated, priority=priority.value,
            inference_seconds=round(sum(img.inference_s for img in images), 4),
            sr_sop_instance_uid=str(sr.SOPInstanceUID), sr_series_uid=str(sr.SeriesInstanceUID),
            sr_path=relative,
            detail={"images": {str(o.header.SOPInstanceUID): (
                {"probability": round(o.probability, 6)} if o.probability is not None
                else {"refused": o.refusal}) for o in outcomes},
                "ineligible": {i.sop_instance_uid: i.reason for i in items if not i.eligible}},
        )
        with unit_of_work(self.sessions) as session:
            recorded = jobs.finish_job(session, job, self.owner, record, self.destinations, utcnow())
        if recorded is None:
            log.warning("job_lost_lease", owner=self.owner)
            return
        log.info("study_scored", outcome="new_result" if recorded else "unchanged",
                 probability=None if study_p is None else round(study_p, 4), priority=priority.value,
                 scored=len(scored), refused=len(outcomes) - len(scored), model=manifest.label,
                 sr=str(sr.SOPInstanceUID))

    def _fail(self, job: jobs.ClaimedJob, error: str, *, transient: bool) -> None:
        w = self.config.worker
        retry_in = timedelta(seconds=w.retry_base_s * 2 ** (job.attempts - 1) * random.uniform(0.5, 1.5))
        try:
            with unit_of_work(self.sessions) as session:
                state = jobs.fail_job(session, job, self.owner, error, transient=transient,
                                      now=utcnow(), max_attempts=w.max_attempts, retry_in=retry_in)
        except SQLAlchemyError as e:
            log.error("job_failure_not_recorded", job_id=job.job_id, error=type(e).__name__)
            return
        log.warning("job_failed", study_uid=job.study_uid, job_id=job.job_id, error=error[:200],
                    transient=transient, state=state.value if state else "lease_lost")


def _prepare(path: Path, spec: PreprocessSpec
             ) -> tuple[pydicom.Dataset | None, np.ndarray | None, str | None]:
    """Header and model input of one spooled instance (read once), or the refusal reason."""
    try:
        ds = read_dicom(path)
    except PreprocessError as e:
        return None, None, f"{e.reason.value}: {e.detail}"[:200]
    try:
        array: np.ndarray | None = preprocess(ds, spec).array
        refusal = None
    except PreprocessError as e:
        array, refusal = None, e.reason.value
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword in ds:
            delattr(ds, keyword)  # the header is kept for the SR; the pixels are not needed
    return ds, array, refusal


def run_worker(config: Config) -> int:
    """Entry point of `opacityd worker`; returns the exit code."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if stop.is_set():
            os._exit(130)
        log.info("worker_shutdown_requested", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if not config.model.bundle:
        log.error("model_bundle_unusable", error="no model bundle configured")
        return 2
    engine = create_db_engine(config.database_url, config.database.busy_timeout_ms)
    predictor = Predictor(Path(config.model.bundle), warm_up_batch=1)
    try:
        worker = Worker(config, make_session_factory(engine), predictor, Spool(config.spool_dir))
    except BundleError as e:
        log.error("model_bundle_unusable", error=str(e))
        return 2
    marker = ready_marker(config, os.getpid())
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(worker.manifest.label + "\n")
    try:
        worker.run(stop)
    finally:
        marker.unlink(missing_ok=True)
        engine.dispose()
    return 0

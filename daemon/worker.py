"""`opacityd worker`: claim jobs, score their eligible images, write the SR, record the result.

A separate process from the receiver. The model is loaded once; jobs are
claimed in batches under a lease, renewed while the batch runs. The batches go
through a pipeline: while the network scores one batch (the main thread), the
next one is claimed and its images decoded and preprocessed (a thread pool),
and the previous one is settled (one finisher thread: SRs, summaries, their
files and the result rows, in claim order). A study's probability is the
maximum over its scored frontal images. A study whose images all fail
preprocessing gets a "not analysable" result and SR listing the reasons. First
SIGTERM claims nothing more and finishes the batches held; a second exits at
once.

Fault boundaries: every job has one (reading its inputs, its images, its
inference, building, writing and recording its SR); a failure there is logged
with its traceback under the job's context, classified (:class:`JobFailure`)
and recorded on the job, and the batch goes on. The run loop has one too: a
failed claim or a bug in the bookkeeping is logged and the loop goes on after
a backoff. A job can fail; the worker process does not.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import signal
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import TypeVar

import numpy as np
import pydicom
import structlog
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from daemon.config import Config
from daemon.dicom.sanitize import Repair, sanitized
from daemon.pids import pid_alive
from daemon.results.report import (
    ImageOutcome,
    build_sr,
    priority_for,
    result_key,
    sr_reference,
    study_probability,
    with_threshold_overrides,
)
from daemon.results.summary import SummaryInput, build_summary, previews
from daemon.spool import TEMP_SUFFIX, Spool
from daemon.web.health import ready_marker
from db import jobs
from db.engine import check_reachable, create_db_engine, make_session_factory, read_only, unit_of_work
from db.jobs import FailureReason
from model.device import configure_threads
from model.durable import fsync_dir
from model.errors import BundleError, PreprocessError
from model.fast_decode import cpus, set_decoder_threads
from model.gradcam import GradCam
from model.predictor import Predictor
from model.preprocess import PreprocessSpec, displayed, preprocess, read_dicom

log = structlog.get_logger("opacityd.worker")

_T = TypeVar("_T")

_TRANSIENT_INFERENCE = frozenset({"MemoryError", "ResourceExhaustedError", "OutOfMemoryError"})
"""Exception type names (any backend) of a network that ran out of memory: worth a retry."""


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class JobFailure:
    """Why one job failed: a short code, whether a retry may help, and free text for operators
    that never quotes a header value (pydicom and highdicom messages may carry patient data)."""

    reason: FailureReason
    transient: bool
    description: str


def describe(exc: BaseException) -> str:
    """The exception's type (and errno name), never its message."""
    name = type(exc).__name__
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{name} {errno.errorcode.get(exc.errno, exc.errno)}"
    return name


def classify(exc: BaseException, stage: FailureReason) -> JobFailure:
    """Map an exception raised while ``stage`` was under way to a recorded failure."""
    if isinstance(exc, OperationalError):
        return JobFailure(FailureReason.DATABASE_BUSY, True,
                          f"database locked or unreachable ({describe(exc)})")
    if isinstance(exc, SQLAlchemyError):
        return JobFailure(FailureReason.DATABASE_ERROR, True, f"database error ({describe(exc)})")
    if stage is FailureReason.SR_BUILD_FAILED:
        return JobFailure(stage, False,
                          f"the SR could not be built from the study's headers ({describe(exc)})")
    if stage is FailureReason.SR_WRITE_FAILED:
        return JobFailure(stage, True, f"the SR file could not be written ({describe(exc)})")
    if stage is FailureReason.INFERENCE_ERROR:
        names = {cls.__name__ for cls in type(exc).__mro__}
        return JobFailure(stage, bool(names & _TRANSIENT_INFERENCE),
                          f"the network raised on an image of this study ({describe(exc)})")
    if stage is FailureReason.PREPROCESS_ERROR:
        return JobFailure(stage, False, f"decoding or preprocessing an image raised ({describe(exc)})")
    return JobFailure(FailureReason.INTERNAL_ERROR, True, f"unexpected error ({describe(exc)})")


def traceback_text(exc: BaseException) -> str:
    """The traceback of ``exc`` and its causes, frames and exception types only: the messages
    are left out because pydicom and highdicom quote header values (patient data) in them."""
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        parts.append("Traceback (most recent call last):\n"
                     + "".join(traceback.format_tb(current.__traceback__))
                     + f"{type(current).__module__}.{type(current).__qualname__}: "
                       "(message withheld: it may quote header values)\n")
        current = current.__cause__ or current.__context__
    return "\nThe above was raised while handling:\n".join(reversed(parts))


@dataclass
class _Stage:
    """What a job's unit of work is doing now, so the boundary can name what failed."""

    reason: FailureReason = FailureReason.INTERNAL_ERROR


@dataclass
class _Image:
    job: jobs.ClaimedJob
    sop_uid: str
    path: Path
    content_hash: str | None = None
    header: pydicom.Dataset | None = None
    array: np.ndarray | None = None
    refusal: str | None = None
    notes: tuple[str, ...] = ()
    """What preprocessing worked around (header inconsistencies, frames skipped)."""
    repairs: tuple[Repair, ...] = ()
    """Header values the outputs' clean copy repaired or dropped (no values)."""
    probability: float | None = None
    inference_s: float = 0.0
    """This image's share of its batch's network time."""
    activations: np.ndarray | None = None
    """The explained layer's output, kept from the prediction until the heatmap is made."""
    heatmap: np.ndarray | None = None
    """Grad-CAM of the image a summary shows (its job's highest-scoring one)."""
    heatmap_problem: str | None = None
    """Why that image has no heatmap."""


class LeaseRenewer:
    """Renews the leases of a batch's jobs every ``lease / 3`` while it runs, so a slow batch is
    never taken by another worker. A context manager; :meth:`release` drops a finished job.

    It gives up after ``HUNG_AFTER_LEASES`` leases: a batch that long is taken as hung (a
    network call that never returns would otherwise hold its jobs for ever), so its leases
    lapse and another worker claims the jobs again (an attempt each)."""

    HUNG_AFTER_LEASES = 10

    def __init__(self, sessions: sessionmaker[Session], owner: str, lease: timedelta,
                 job_ids: Iterable[int]) -> None:
        self.sessions = sessions
        self.owner = owner
        self.lease = lease
        self._jobs = set(job_ids)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-renewer", daemon=True)

    def __enter__(self) -> LeaseRenewer:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def release(self, job_id: int) -> None:
        with self._lock:
            self._jobs.discard(job_id)

    def _run(self) -> None:
        interval = self.lease.total_seconds() / 3
        give_up = time.monotonic() + self.HUNG_AFTER_LEASES * self.lease.total_seconds()
        while not self._stop.wait(interval):
            with self._lock:
                pending = sorted(self._jobs)
            if not pending:
                continue
            if time.monotonic() >= give_up:
                log.error("lease_renewal_stopped", jobs=pending, owner=self.owner,
                          why=f"batch ran longer than {self.HUNG_AFTER_LEASES} leases")
                return
            try:
                with unit_of_work(self.sessions) as session:
                    now = utcnow()
                    gone = [job_id for job_id in pending
                            if not jobs.renew_lease(session, job_id, self.owner, self.lease, now)]
                    # A job settled between the snapshot above and its release is not lost.
                    lost = {job_id for job_id in gone if jobs.taken_over(session, job_id)}
            except Exception:  # the renewal loop's boundary: log, try again next tick
                log.warning("lease_renewal_failed", jobs=pending, exc_info=True)
                continue
            for job_id in gone:
                if job_id in lost:
                    log.warning("lease_lost", job_id=job_id, owner=self.owner)
                self.release(job_id)


class _CpuTimes:
    """CPU seconds the worker's threads spent per stage, for ``worker_stopped``: where the
    worker's share of the host goes (the network's pools are what is left of the process's)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seconds = {"preprocess": 0.0, "settle": 0.0}

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self._seconds[stage] += seconds

    def timed(self, stage: str, fn: Callable[..., _T], *args: object) -> _T:
        """``fn(*args)``, its thread's CPU time added to ``stage``."""
        started = time.thread_time()
        try:
            return fn(*args)
        finally:
            self.add(stage, time.thread_time() - started)

    def summary(self, process_s: float) -> dict[str, float]:
        """``process_s`` (the process's CPU seconds) split: preprocessing (the pool), settling
        (SRs, summaries, files, result rows) and the rest (the network's pools, claims,
        Grad-CAM and the loop)."""
        with self._lock:
            seconds = dict(self._seconds)
        return {"process": round(process_s, 2),
                **{stage: round(value, 2) for stage, value in seconds.items()},
                "network_and_rest": round(process_s - sum(seconds.values()), 2)}


@dataclass
class _Batch:
    """One claimed batch on its way through the worker: claimed, its images submitted for
    preprocessing (:meth:`Worker._begin_next`), collected (:meth:`Worker._collect`), scored
    (:meth:`Worker._infer`), then settled (:meth:`Worker._settle`)."""

    claimed: list[jobs.ClaimedJob]
    renewer: LeaseRenewer
    inputs: dict[int, list[jobs.JobInput]] = field(default_factory=dict)
    images: list[_Image] = field(default_factory=list)
    prepared: list[Future[_Prepared | Exception]] = field(default_factory=list)
    """The images' preprocessing, in the pool; emptied once collected."""
    failures: dict[int, tuple[JobFailure, BaseException | None]] = field(default_factory=dict)
    broken: BaseException | None = None
    """A fault in the batch's own bookkeeping while it was scored: its jobs fail with it."""


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
        self.retry = config.worker.retry
        self.waiting: str | None = None
        """Why the worker claims nothing now (``database``, ``spool_not_mounted``), or None."""
        self.waits = 0
        self.pool = ThreadPoolExecutor(config.worker.threads, thread_name_prefix="preprocess")
        self.finisher = ThreadPoolExecutor(1, thread_name_prefix="finish")
        """Settles scored batches (SRs, summaries, result rows) one at a time, in claim order,
        while the network scores the next batch."""
        self._settling: Future[None] | None = None
        self._cpu = _CpuTimes()
        self.sr_destinations = [d.name for d in config.destinations
                                if d.enabled and "sr" in d.send] if config.delivery.enabled else []
        self.summary_destinations = ([d.name for d in config.destinations
                                      if d.enabled and "summary" in d.send]
                                     if config.delivery.enabled and config.summary.enabled else [])
        hl7 = [d.name for d in config.hl7_destinations if d.enabled]
        self.hl7_destinations = hl7 if config.delivery.enabled else []
        self._explainer: GradCam | str | None = None
        """Grad-CAM for the loaded model, made at first use, or why it cannot be made."""

    def run(self, stop: threading.Event) -> None:
        """Process batches until ``stop`` is set, as a pipeline: while the network scores one
        batch, the next one is claimed and preprocessed (the pool) and the previous one is
        settled (the finisher thread: SRs, summaries, files, result rows). At most three
        batches are held: one settling, one scoring, one preprocessing. Once ``stop`` is set,
        nothing more is claimed; what is held is scored and settled before this returns."""
        log.info("worker_started", owner=self.owner, model=self.manifest.label,
                 thresholds=dataclasses.asdict(self.manifest.thresholds),
                 device=self.predictor.device, sr_destinations=self.sr_destinations,
                 summary_destinations=self.summary_destinations,
                 hl7_destinations=self.hl7_destinations,
                 shadow_mode=not self.config.delivery.enabled,
                 batch_size=self.config.worker.batch_size,
                 preprocess_threads=self.config.worker.threads)
        started_cpu = time.process_time()
        faults = 0
        ahead: _Batch | None = None
        try:
            while ahead is not None or not stop.is_set():
                batch, ahead = ahead, None
                try:
                    if batch is None:
                        batch = self._begin_next()
                    if batch is None:
                        faults = 0
                        # Waiting on the database or the spool mount backs off; an empty queue
                        # does not.
                        stop.wait(self.retry.delay_s(self.waits) if self.waiting
                                  else self.config.worker.poll_interval_s)
                        continue
                    ahead = self._step(batch, prefetch=not stop.is_set())
                    faults = 0
                except Exception:  # the run loop's boundary: a fault in bookkeeping never ends the worker
                    faults += 1
                    delay = self.retry.delay_s(faults)
                    log.exception("worker_loop_failed", consecutive=faults, retry_in_s=round(delay, 2))
                    stop.wait(delay)
        finally:
            self._await_settling()
            self.pool.shutdown(wait=True)
            self.finisher.shutdown(wait=True)
        log.info("worker_stopped", owner=self.owner,
                 cpu_s=self._cpu.summary(time.process_time() - started_cpu))

    def run_once(self) -> int:
        """Claim, score and settle one batch of jobs, one step after the other; returns how many
        were claimed (0 also while the spool is not mounted or the database is unreachable)."""
        batch = self._begin_next()
        if batch is None:
            return 0
        try:
            self._collect(batch)
            self._infer(batch)
        finally:
            self._settle(batch)
        return len(batch.claimed)

    def _step(self, batch: _Batch, prefetch: bool) -> _Batch | None:
        """Score ``batch`` and hand it to the finisher; with ``prefetch``, claim the next batch
        once this one's inputs are ready, so that its preprocessing overlaps this one's
        inference. Returns that next batch (None when nothing was claimed)."""
        ahead = None
        try:
            self._collect(batch)
            if prefetch:
                ahead = self._begin_next()
            self._infer(batch)
        finally:
            self._hand_over(batch)
        return ahead

    def _hand_over(self, batch: _Batch) -> None:
        """Settle ``batch`` on the finisher thread, once the batch before it is settled (so
        results are recorded in the order jobs were claimed, and one batch at most waits)."""
        self._await_settling()
        self._settling = self.finisher.submit(self._settle, batch)

    def _await_settling(self) -> None:
        """Wait until the batch handed to the finisher is settled."""
        if self._settling is None:
            return
        try:
            self._settling.result()
        except Exception:  # noqa: BLE001 - _settle records its own failures; this is a bug in it
            log.exception("batch_settling_failed")
        self._settling = None

    def _begin_next(self) -> _Batch | None:
        """Claim the next batch under a lease and start preprocessing its images in the pool;
        None when nothing was claimed.

        Claims nothing while the spool is not mounted here (no :data:`daemon.spool.MARKER`) or
        the database cannot be reached; both are logged when they begin and when they end."""
        if not self.spool.mounted():
            self._wait_for("spool_not_mounted", spool=str(self.spool.root))
            return None
        try:
            with unit_of_work(self.sessions) as session:
                now = utcnow()
                abandoned = jobs.abandon_exhausted(session, now, self.retry.max_attempts, self.owner)
                claimed = jobs.claim_jobs(session, self.owner, self.lease, now,
                                          self.config.worker.batch_size,
                                          max_attempts=self.retry.max_attempts)
        except SQLAlchemyError as e:
            self._wait_for("database", error=describe(e))
            return None
        if self.waiting is not None:
            log.info("worker_resumed", waited_for=self.waiting, polls=self.waits)
            self.waiting, self.waits = None, 0
        for gone in abandoned:
            log.critical("job_abandoned", study_uid=gone.study_uid, job_id=gone.job_id,
                         attempts=gone.attempts, reason=FailureReason.ABANDONED.value)
        if not claimed:
            return None
        batch = _Batch(claimed, LeaseRenewer(self.sessions, self.owner, self.lease,
                                             [job.job_id for job in claimed]).__enter__())
        for job in claimed:
            try:
                with read_only(self.sessions) as session:
                    batch.inputs[job.job_id] = jobs.job_inputs(session, job.study_id)
            except Exception as e:  # noqa: BLE001 - this job's boundary: its inputs could not be read
                batch.failures[job.job_id] = (classify(e, FailureReason.DATABASE_ERROR), e)
        batch.images = [_Image(job, item.sop_instance_uid, self.spool.absolute(item.spool_path),
                               item.content_hash)
                        for job in claimed if job.job_id not in batch.failures
                        for item in batch.inputs[job.job_id] if item.eligible and item.spool_path]
        spec = self.predictor.manifest.preprocessing
        batch.prepared = [self.pool.submit(self._cpu.timed, "preprocess", _prepare_guarded,
                                           img.path, spec) for img in batch.images]
        return batch

    def _wait_for(self, reason: str, **detail: str) -> None:
        """Note one poll spent waiting for ``reason``; logged at its start, then every 20th."""
        if self.waiting != reason:
            self.waiting, self.waits = reason, 0
        self.waits += 1
        if self.waits == 1 or self.waits % 20 == 0:
            log.warning("worker_waiting", reason=reason, polls=self.waits,
                        retry_in_s=round(self.retry.delay_s(self.waits), 2), **detail)

    def _collect(self, batch: _Batch) -> None:
        """Wait for the batch's preprocessed images. Never raises: a fault here is the batch's
        (:attr:`_Batch.broken`), and its jobs fail with it when it is settled."""
        try:
            for img, future in zip(batch.images, batch.prepared, strict=True):
                prepared = future.result()
                if isinstance(prepared, BaseException):
                    batch.failures.setdefault(
                        img.job.job_id, (classify(prepared, FailureReason.PREPROCESS_ERROR), prepared))
                else:
                    img.header, img.array, img.refusal, img.notes, img.repairs = prepared
        except Exception as e:  # noqa: BLE001 - the batch's boundary: recorded on its jobs when settled
            batch.broken = e
        batch.prepared = []

    def _infer(self, batch: _Batch) -> None:
        """Score the batch's images in chunks of ``batch_size`` and take the heatmaps its
        summaries show. Never raises (as :meth:`_collect`)."""
        if batch.broken is not None:
            return
        try:
            ready = [img for img in batch.images
                     if img.array is not None and img.job.job_id not in batch.failures]
            batch_size = self.config.worker.batch_size
            for start in range(0, len(ready), batch_size):
                self._predict(ready[start:start + batch_size], batch.failures)
            if self.config.summary.enabled:
                self._explain(ready, batch.failures)
            else:
                for img in ready:
                    img.array = None
        except Exception as e:  # noqa: BLE001 - the batch's boundary: recorded on its jobs when settled
            batch.broken = e

    def _settle(self, batch: _Batch) -> None:
        """Finish every job of a scored batch (SR, summary, result row and deliveries) or record
        its failure, then stop renewing the batch's leases. Every job ends done, retried or
        failed with its reason; never raises."""
        settled: set[int] = set()
        started = time.thread_time()
        try:
            for job in batch.claimed:
                settled.add(job.job_id)
                if batch.broken is not None:
                    with structlog.contextvars.bound_contextvars(study_uid=job.study_uid,
                                                                 job_id=job.job_id):
                        self._fail(job, classify(batch.broken, FailureReason.INTERNAL_ERROR),
                                   batch.broken)
                elif job.job_id in batch.failures:
                    failure, exc = batch.failures[job.job_id]
                    with structlog.contextvars.bound_contextvars(study_uid=job.study_uid,
                                                                 job_id=job.job_id):
                        self._fail(job, failure, exc)
                else:
                    self._finish(job, batch.inputs[job.job_id],
                                 [img for img in batch.images if img.job is job])
                batch.renewer.release(job.job_id)
        except Exception as e:  # noqa: BLE001 - the batch's boundary: a bug fails what is left (retried)
            for job in batch.claimed:
                if job.job_id not in settled:
                    with structlog.contextvars.bound_contextvars(study_uid=job.study_uid,
                                                                 job_id=job.job_id):
                        self._fail(job, classify(e, FailureReason.INTERNAL_ERROR), e)
        finally:
            batch.renewer.__exit__()
            self._cpu.add("settle", time.thread_time() - started)

    def _predict(self, chunk: list[_Image],
                 failures: dict[int, tuple[JobFailure, BaseException | None]]) -> None:
        """Predict one chunk. When the network raises on a chunk of several images, each is tried
        alone, so only the job of the image that raises fails; the others keep their scores."""
        started = time.perf_counter()
        explainer = self.explainer() if self.config.summary.enabled else None
        activations: np.ndarray | None = None
        try:
            batch = np.stack([img.array for img in chunk if img.array is not None])
            if isinstance(explainer, GradCam):
                # One forward pass gives the scores and what the heatmaps need.
                outputs, activations = explainer.predict(self.predictor.padded(batch))
                probabilities = self.predictor.probabilities(outputs[:len(batch)])
            else:
                probabilities = self.predictor.predict(batch)
        except Exception as e:  # noqa: BLE001 - the chunk's boundary: isolate the culprit, keep the rest
            if len(chunk) == 1:
                (img,) = chunk
                failures.setdefault(img.job.job_id, (classify(e, FailureReason.INFERENCE_ERROR), e))
                return
            log.warning("batch_inference_failed", images=len(chunk), error=describe(e),
                        retry="image_by_image")
            for img in chunk:
                if img.job.job_id not in failures:
                    self._predict([img], failures)
            return
        share = (time.perf_counter() - started) / len(chunk)
        for i, (img, p) in enumerate(zip(chunk, probabilities, strict=True)):
            if not np.isfinite(p):  # a broken network or input: never a score in an SR
                failures.setdefault(img.job.job_id, (JobFailure(
                    FailureReason.INFERENCE_ERROR, False,
                    "the network returned a non-finite probability for an image of this study"),
                    None))
                continue
            img.probability = float(p)
            img.inference_s = share
            if activations is not None:
                img.activations = activations[i]

    def explainer(self) -> GradCam | str:
        """Grad-CAM for the loaded model, or why there is none (made once)."""
        if self._explainer is None:
            try:
                self._explainer = GradCam(self.predictor.model)
            except (ValueError, NotImplementedError) as e:
                self._explainer = f"Grad-CAM is not available for this model ({describe(e)})"
                log.warning("heatmap_unavailable", error=str(e)[:200], model=self.manifest.label)
        return self._explainer

    def _explain(self, ready: list[_Image],
                 failures: dict[int, tuple[JobFailure, BaseException | None]]) -> None:
        """Grad-CAM, in batches, of each job's highest-scoring image (the one its summary shows),
        from the activations its prediction kept; the other images' arrays and activations are
        dropped. A failure leaves those images without a heatmap and a reason, never fails a
        job: the SR does not depend on it."""
        top: dict[int, _Image] = {}
        for img in ready:
            if img.probability is None or img.job.job_id in failures:
                continue
            best = top.get(img.job.job_id)
            if best is None or img.probability > (best.probability or 0.0):
                top[img.job.job_id] = img
        chosen = list(top.values())
        kept = {id(img) for img in chosen}
        for img in ready:
            if id(img) not in kept:
                img.array = img.activations = None
        explainer = self.explainer()
        batch_size = self.config.worker.batch_size
        for start in range(0, len(chosen), batch_size):
            chunk = chosen[start:start + batch_size]
            if isinstance(explainer, str):
                for img in chunk:
                    img.heatmap_problem = explainer
                continue
            try:
                maps = explainer.from_activations(
                    np.stack([img.activations for img in chunk if img.activations is not None]),
                    explainer.input_shape[:2])
            except Exception as e:  # noqa: BLE001 - the heatmap's boundary: the summary says so
                log.warning("heatmap_failed", images=len(chunk), error=describe(e),
                            exception=traceback_text(e))
                for img in chunk:
                    img.heatmap_problem = f"Grad-CAM failed ({describe(e)})"
                continue
            for img, heat in zip(chunk, maps, strict=True):
                img.heatmap = heat
                img.activations = None

    def _finish(self, job: jobs.ClaimedJob, items: list[jobs.JobInput], images: list[_Image]) -> None:
        with structlog.contextvars.bound_contextvars(study_uid=job.study_uid, job_id=job.job_id):
            stage = _Stage()
            try:
                failure = self._record(job, items, images, stage)
            except Exception as e:  # noqa: BLE001 - the job's boundary: record why, go on with the next job
                self._fail(job, classify(e, stage.reason), e)
                return
            if failure is not None:
                self._fail(job, failure, None)

    def _record(self, job: jobs.ClaimedJob, items: list[jobs.JobInput], images: list[_Image],
                stage: _Stage) -> JobFailure | None:
        """Build, write and record the job's SR; returns the failure when the job's images do
        not allow a result (``stage`` says what was under way when something raised)."""
        manifest = self.manifest
        outcomes = [ImageOutcome(img.header, img.probability, img.refusal, img.content_hash)
                    for img in images if img.header is not None]
        missing = [img.sop_uid for img in images if img.header is None and not img.path.exists()]
        if missing and not self.spool.mounted():
            # The mount went away under the job: retried, not failed, once it is back.
            return JobFailure(FailureReason.SPOOL_NOT_MOUNTED, True,
                              f"the spool {self.spool.root} is not mounted on this host")
        if missing:
            return JobFailure(FailureReason.SPOOL_FILE_MISSING, False,
                              f"spooled instances missing: {', '.join(missing)}"[:1000])
        unreadable = [f"{img.sop_uid} ({img.refusal})" for img in images if img.header is None]
        if unreadable:
            # The spool lost an acknowledged instance: an operator must look; requeue after.
            return JobFailure(FailureReason.SPOOL_UNREADABLE, False,
                              f"spooled instances unreadable: {', '.join(unreadable)}"[:1000])
        if not outcomes:
            return JobFailure(FailureReason.NO_INPUT, False,
                              "no eligible image is held for this study")
        study_p = study_probability(outcomes)
        scored = [str(o.header.SOPInstanceUID) for o in outcomes if o.probability is not None]
        stage.reason = FailureReason.SR_BUILD_FAILED
        key = result_key(job.study_uid, job.revision, outcomes, manifest)
        stage.reason = FailureReason.DATABASE_ERROR
        with read_only(self.sessions) as session:
            latest = jobs.latest_result(session, job.study_id)
            previous = None if latest is None else (
                latest.sr_sop_instance_uid, latest.sr_series_uid,
                json.loads(latest.detail or "{}").get("key"))
            previous_summary = None if latest is None else latest.summary_sop_instance_uid
        if previous is not None and previous[2] == key:
            # The study's latest SR already says exactly this: nothing new to build or send.
            with unit_of_work(self.sessions) as session:
                done = jobs.finish_unchanged(session, job, self.owner, previous[0], utcnow())
            if not done:
                log.warning("job_lost_lease", owner=self.owner)
                return None
            log.info("study_scored", outcome="unchanged", sr=previous[0], model=manifest.label)
            return None
        repairs = [{"attribute": k, "action": a, "problem": p} for k, a, p in sorted(
            {(r.keyword, r.action.value, r.problem.value) for img in images for r in img.repairs})]
        if repairs:
            log.warning("header_sanitised", repairs=repairs)
        stage.reason = FailureReason.SR_BUILD_FAILED
        # The predecessor is named from its result row: its file need not be read (or held).
        predecessor = None if previous is None else sr_reference(job.study_uid, previous[1],
                                                                 previous[0])
        sr = build_sr(job.study_uid, outcomes, manifest, revision=job.revision,
                      previous=predecessor)
        buffer = pydicom.filebase.DicomBytesIO()
        sr.save_as(buffer, enforce_file_format=True)
        stage.reason = FailureReason.SR_WRITE_FAILED
        relative = f"sr/{job.study_uid}/{sr.SOPInstanceUID}.dcm"
        written = write_once(self.spool.absolute(relative), buffer.getvalue())
        summary_started = time.perf_counter()
        summary = self._summary(job, images, outcomes, study_p, key, previous_summary)
        summary_s = time.perf_counter() - summary_started
        stage.reason = FailureReason.DATABASE_ERROR
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
            detail={"key": key, "images": {img.sop_uid: _image_detail(img) for img in images},
                    "ineligible": {i.sop_instance_uid: i.reason for i in items if not i.eligible},
                    "header": repairs, "summary": summary.detail()},
            summary_sop_instance_uid=summary.sop_instance_uid, summary_path=summary.path,
        )
        with unit_of_work(self.sessions) as session:
            recorded = jobs.finish_job(session, job, self.owner, record, self.sr_destinations,
                                       utcnow(), self.hl7_destinations,
                                       self.summary_destinations if summary.path else [])
        if recorded is None:
            log.warning("job_lost_lease", owner=self.owner)
            return None
        log.info("study_scored", outcome="new_result" if recorded else "unchanged",
                 probability=None if study_p is None else round(study_p, 4), priority=priority.value,
                 scored=len(scored), refused=len(outcomes) - len(scored), model=manifest.label,
                 sr=str(sr.SOPInstanceUID), sr_file="written" if written else "kept",
                 summary=summary.sop_instance_uid, summary_reason=summary.reason,
                 summary_ms=round(summary_s * 1000, 1))
        return None

    def _summary(self, job: jobs.ClaimedJob, images: list[_Image], outcomes: list[ImageOutcome],
                 study_p: float | None, key: str, previous_uid: str | None) -> SummaryMade:
        """Build and write the result's summary image and preview PNGs. Never raises: a summary
        that cannot be made is recorded with its reason, and the SR goes out regardless."""
        if not self.config.summary.enabled:
            return SummaryMade(reason="summary images are off (summary.enabled = false)")
        shown = next((img for img in images if img.array is not None), None)
        source = shown.header if shown is not None else outcomes[0].header
        if source is None:
            return SummaryMade(reason="no header to file a summary under")
        network_input = None if shown is None or shown.array is None else displayed(shown.array)
        item = SummaryInput(
            study_uid=job.study_uid, revision=job.revision, key=key, manifest=self.manifest,
            probability=study_p, source=source, network_input=network_input,
            heatmap=None if shown is None else shown.heatmap,
            heatmap_problem=None if shown is None else shown.heatmap_problem,
            scored_images=sum(1 for o in outcomes if o.probability is not None),
            refusals=[o.refusal for o in outcomes if o.probability is None],
            previous_uid=previous_uid)
        if study_p is None:
            reason: str | None = "not analysable: no image was scored, so no heatmap"
        elif shown is None:
            reason = "the scored image is no longer in memory"
        else:
            reason = shown.heatmap_problem
        try:
            sc = build_summary(item)
            buffer = pydicom.filebase.DicomBytesIO()
            sc.save_as(buffer, enforce_file_format=True)
            uid = str(sc.SOPInstanceUID)
            path = f"summary/{job.study_uid}/{uid}.dcm"
            write_once(self.spool.absolute(path), buffer.getvalue())
            pictures: dict[str, str] = {}
            for name, data in previews(item).items():
                pictures[name] = f"previews/{job.study_uid}/{uid}/{name}.png"
                write_once(self.spool.absolute(pictures[name]), data)
        except Exception as e:  # noqa: BLE001 - the summary's boundary: recorded, the SR goes on
            log.warning("summary_not_built", error=describe(e), exception=traceback_text(e))
            return SummaryMade(image=None if shown is None else shown.sop_uid,
                               reason=f"the summary image could not be made ({describe(e)})")
        finally:
            if shown is not None:
                shown.array = None
        return SummaryMade(image=None if shown is None else shown.sop_uid, sop_instance_uid=uid,
                           path=path, reason=reason, input_png=pictures.get("input"),
                           heatmap_png=pictures.get("heatmap"))

    def _fail(self, job: jobs.ClaimedJob, failure: JobFailure, exc: BaseException | None) -> None:
        """Record ``failure`` on the job (retry after the policy's delay, or failed) and log it,
        with the traceback when an exception caused it. Never raises."""
        retry_in = self.retry.delay(job.attempts)
        try:
            with unit_of_work(self.sessions) as session:
                state = jobs.fail_job(session, job, self.owner, failure.description,
                                      transient=failure.transient, now=utcnow(),
                                      max_attempts=self.retry.max_attempts, retry_in=retry_in,
                                      reason=failure.reason)
        except Exception as e:  # noqa: BLE001 - not recorded: the lease expiry retries the job
            log.error("job_failure_not_recorded", reason=failure.reason.value, error=describe(e),
                      exception=traceback_text(e))
            return
        fields: dict[str, object] = {
            "reason": failure.reason.value, "transient": failure.transient,
            "error": failure.description[:200], "attempt": job.attempts,
            "state": state.value if state else "lease_lost"}
        if state is not None and state.value == "queued":
            fields["retry_in_s"] = round(retry_in.total_seconds(), 2)
        if exc is not None:
            fields["exception"] = traceback_text(exc)
        if failure.transient and state is not None and state.value == "queued":
            log.warning("job_failed", **fields)
        else:
            log.error("job_failed", **fields)


@dataclass(frozen=True)
class SummaryMade:
    """What became of a result's summary: its image and files, or why there is none (or why
    it shows no heatmap)."""

    image: str | None = None
    """SOP Instance UID of the image it shows."""
    sop_instance_uid: str | None = None
    path: str | None = None
    """The Secondary Capture file, relative to the spool root."""
    reason: str | None = None
    input_png: str | None = None
    heatmap_png: str | None = None

    def detail(self) -> dict[str, str | None]:
        """The result detail's ``summary`` entry (what the worklist page reads)."""
        return {"image": self.image, "sop_instance_uid": self.sop_instance_uid,
                "reason": self.reason, "input_png": self.input_png,
                "heatmap_png": self.heatmap_png}


def _image_detail(img: _Image) -> dict[str, object]:
    """One image's entry in the result detail: its probability or refusal, and any notes."""
    entry: dict[str, object] = (
        {"probability": round(img.probability, 6)} if img.probability is not None
        else {"refused": img.refusal})
    if img.notes:
        entry["notes"] = list(img.notes)
    return entry


def write_once(path: Path, data: bytes) -> bool:
    """Write ``data`` durably at ``path`` unless a file is already there; returns whether it
    wrote. A stored SR is never overwritten: the bytes go to a fsynced temporary file that is
    hard-linked to ``path`` (which fails when ``path`` exists) and then removed.

    Raises :class:`OSError` (ENOSPC on a full disk); nothing is left behind then."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}{TEMP_SUFFIX}")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(temp, path)
        except FileExistsError:
            return False
        fsync_dir(path.parent)
        return True
    finally:
        temp.unlink(missing_ok=True)


_Prepared = tuple[pydicom.Dataset | None, np.ndarray | None, str | None, tuple[str, ...],
                  tuple[Repair, ...]]


def _prepare_guarded(path: Path, spec: PreprocessSpec) -> _Prepared | Exception:
    """:func:`_prepare`, or the exception it raised (the image's boundary: the caller records
    it on the image's job), so one bad image never ends the batch."""
    try:
        return _prepare(path, spec)
    except Exception as e:  # noqa: BLE001 - one image's boundary; recorded on its job by the caller
        return e


def _prepare(path: Path, spec: PreprocessSpec) -> _Prepared:
    """The clean header copy (for the outputs; pixels left out), the model input and
    preprocessing's notes of one spooled instance (read once), or the refusal reason; and what
    the clean copy repaired or dropped."""
    try:
        ds = read_dicom(path)
    except PreprocessError as e:
        return None, None, e.reason.value, (), ()  # the detail may quote the file's bytes
    notes: tuple[str, ...] = ()
    try:
        prepared = preprocess(ds, spec)
        array: np.ndarray | None = prepared.array
        notes, refusal = prepared.notes, None
    except PreprocessError as e:
        array, refusal = None, e.reason.value
    clean = sanitized(ds)
    return clean.dataset, array, refusal, notes, clean.repairs


def release_dead_local_leases(sessions: sessionmaker[Session], max_attempts: int) -> None:
    """At start: jobs still RUNNING under a worker of this host whose process is gone (the
    previous worker, killed; systemd restarted this one) go back to the queue at once, instead
    of waiting for their leases to expire while `status` looks healthy. A reused pid only
    delays this to the lease's expiry. Never raises: the leases expire anyway."""
    host = socket.gethostname()
    try:
        with read_only(sessions) as session:
            owners = jobs.running_owners(session, f"{host}:")
        dead = {int(parts[1]) for owner in owners
                if len(parts := owner.split(":")) >= 3 and parts[1].isdigit()
                and not pid_alive(int(parts[1]))}
        for pid in sorted(dead):
            with unit_of_work(sessions) as session:
                requeued, abandoned = jobs.release_leases(
                    session, f"{host}:{pid}:", utcnow(), max_attempts, actor="worker")
            log.warning("dead_worker_leases_released", pid=pid, jobs=requeued,
                        abandoned=[j.job_id for j in abandoned])
            for job in abandoned:
                log.critical("job_abandoned", study_uid=job.study_uid, job_id=job.job_id,
                             attempts=job.attempts, reason=FailureReason.ABANDONED.value, pid=pid)
    except SQLAlchemyError as e:
        log.error("dead_worker_leases_not_released", error=type(e).__name__)


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
    check_reachable(engine)  # raises DatabaseUnreachable: cli.main says so and exits 2
    threads = configure_threads(config.worker.inference_threads or os.cpu_count() or 1,
                                config.worker.inference_inter_op_threads)
    decode = set_decoder_threads(cpus() // config.worker.threads)
    log.info("inference_threads", preprocess=config.worker.threads, decode_per_image=decode,
             cpus=os.cpu_count(), **threads)
    predictor = Predictor(Path(config.model.bundle), warm_up_batch=1)
    try:
        worker = Worker(config, make_session_factory(engine), predictor, Spool(config.spool_dir))
    except BundleError as e:
        log.error("model_bundle_unusable", error=str(e))
        return 2
    release_dead_local_leases(worker.sessions, config.worker.retry.max_attempts)
    marker = ready_marker(config, os.getpid())
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(worker.manifest.label + "\n")
    try:
        worker.run(stop)
    finally:
        marker.unlink(missing_ok=True)
        engine.dispose()
    return 0

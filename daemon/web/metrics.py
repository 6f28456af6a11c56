"""Prometheus metrics for /metrics.

Counters the receiver increments in this process (instances received/refused, re-sends with
other bytes, associations rejected, connections refused or aborted by the transport guard,
refused presentation contexts); gauges read from the database at scrape time (queue depth
per state, job and delivery outcomes, results per priority), so they cover the worker process
too and survive restarts; histograms fed at scrape time from rows written since the last scrape
(inference time per study, receive-to-delivered latency). Every scrape reads in a transaction
that takes no write lock, so scraping never holds up a C-STORE.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy.orm import Session, sessionmaker

from daemon.disk import DiskGuard
from db import queue
from db.engine import read_only
from db.models import Delivery, Result, Study
from db.states import DeliveryKind, DeliveryState
from model.manifest import Manifest

LATENCY_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600, float("inf"))
INFERENCE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, float("inf"))


class _DatabaseCollector(Collector):
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with read_only(self.sessions) as session:
            counts = queue.state_counts(session)
            deliveries = {(kind, state): count for kind, state, count in session.execute(
                sa.select(Delivery.kind, Delivery.state, sa.func.count())
                .group_by(Delivery.kind, Delivery.state)).all()}
            priorities = dict(session.execute(sa.select(Result.priority, sa.func.count())
                                              .group_by(Result.priority)).all())
        for name, doc in (("studies", "Studies per state"), ("jobs", "Scoring jobs per state")):
            family = GaugeMetricFamily(f"opacityd_{name}", doc, labels=["state"])
            for state, value in counts[name].items():
                family.add_metric([state], value)
            yield family
        family = GaugeMetricFamily("opacityd_deliveries",
                                   "Deliveries per kind (sr, hl7) and state", labels=["kind", "state"])
        for kind in DeliveryKind:
            for state in DeliveryState:
                family.add_metric([kind.value, state.value], int(deliveries.get((kind, state), 0)))
        yield family
        family = GaugeMetricFamily("opacityd_results", "Results recorded per priority", labels=["priority"])
        for priority, value in sorted(priorities.items()):
            family.add_metric([priority], int(value))
        yield family


class Metrics:
    def __init__(self, sessions: sessionmaker[Session], manifest: Manifest | None = None,
                 disk: DiskGuard | None = None) -> None:
        self.registry = CollectorRegistry()
        self.sessions = sessions
        self.disk = disk
        self.received = Counter("opacityd_instances_received", "Instances acknowledged (0x0000)",
                                ["eligible", "reason"], registry=self.registry)
        self.refused = Counter("opacityd_instances_refused", "C-STORE requests refused, by reason",
                               ["reason"], registry=self.registry)
        self.duplicate_conflicts = Counter(
            "opacityd_duplicate_conflicts", "Re-sent SOP Instance UIDs with other bytes, by the "
            "receiver.duplicate_policy applied", ["policy"], registry=self.registry)
        self.rejected = Counter("opacityd_associations_rejected", "Associations rejected, by reason",
                                ["reason"], registry=self.registry)
        self.connections_refused = Counter(
            "opacityd_connections_refused", "DICOM connections closed before association, by reason "
            "(per_address_limit, pending_evicted, request_timeout, oversized_pdu, unexpected_pdu, ...)",
            ["reason"], registry=self.registry)
        self.associations_aborted = Counter(
            "opacityd_associations_aborted_by_guard", "Associations aborted by the transport guard, "
            "by reason (oversized_pdu, read_timeout, dataset_too_large)", ["reason"],
            registry=self.registry)
        self.contexts_refused = Counter(
            "opacityd_presentation_contexts_refused", "Presentation contexts refused in accepted "
            "associations, by reason", ["reason"], registry=self.registry)
        self.slots_exhausted = Counter(
            "opacityd_association_slots_exhausted", "Times every association slot became taken",
            registry=self.registry)
        self.connections = Gauge("opacityd_dicom_connections", "Open DICOM connections, by phase",
                                 ["phase"], registry=self.registry)
        self.inference = Histogram("opacityd_inference_seconds", "Network time per scored study",
                                   buckets=INFERENCE_BUCKETS, registry=self.registry)
        self.latency = Histogram("opacityd_receive_to_delivered_seconds",
                                 "Last instance received to SR delivered (kind sr) or HL7 result "
                                 "acknowledged (kind hl7), per delivery", ["kind"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.free = Gauge("opacityd_spool_free_bytes", "Free bytes in the spool's file system",
                          registry=self.registry)
        if manifest is not None:
            Info("opacityd_model", "The served model bundle", registry=self.registry).info(
                {"name": manifest.name, "version": manifest.version,
                 "validated": str(manifest.validated).lower()})
        self.registry.register(_DatabaseCollector(sessions))
        self._lock = threading.Lock()
        with read_only(sessions) as session:
            self._last_result = session.scalar(sa.select(sa.func.max(Result.id))) or 0
            self._last_delivered = (session.scalar(sa.select(sa.func.max(Delivery.delivered_at)))
                                    or datetime.now(UTC))

    def _observe_new_rows(self) -> None:
        with read_only(self.sessions) as session:
            for result_id, seconds in session.execute(
                    sa.select(Result.id, Result.inference_seconds).where(Result.id > self._last_result)
                    .order_by(Result.id)):
                self._last_result = result_id
                if seconds is not None:
                    self.inference.observe(seconds)
            for delivered_at, received_at, kind in session.execute(
                    sa.select(Delivery.delivered_at, Study.last_received_at, Delivery.kind)
                    .join(Result, Result.id == Delivery.result_id).join(Study, Study.id == Result.study_id)
                    .where(Delivery.delivered_at > self._last_delivered).order_by(Delivery.delivered_at)):
                if delivered_at is None:
                    continue
                self._last_delivered = delivered_at
                self.latency.labels(kind.value).observe(
                    max(0.0, (delivered_at - received_at).total_seconds()))

    def render(self) -> bytes:
        """The exposition text; brings the histograms and disk gauge up to date first."""
        with self._lock:
            self._observe_new_rows()
            if self.disk is not None:
                self.free.set(self.disk.free_bytes())
            return bytes(generate_latest(self.registry))

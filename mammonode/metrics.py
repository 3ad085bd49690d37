"""Prometheus metrics of one node process (exposed at /metrics).

Counters and histograms are kept in-process; queue depths, delivery states and worker
heartbeat ages are read from the database at scrape time, so they are right however many
processes share the database.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, select

from mammonode.db.models import Delivery, Job, Study, Worker, utcnow


class NodeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.instances = Counter(
            "mammonode_instances_received",
            "Instances received, by SOP class, outcome and listener",
            ["sop_class", "outcome", "listener"],
            registry=self.registry,
        )
        self.associations = Counter(
            "mammonode_associations", "DIMSE associations by result", ["result"], registry=self.registry
        )
        self.active_associations = Gauge(
            "mammonode_active_associations", "DIMSE associations open now", registry=self.registry
        )
        self.stage_seconds = Histogram(
            "mammonode_job_stage_seconds",
            "Pipeline stage durations",
            ["stage"],
            buckets=(0.1, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 240, 480, 960),
            registry=self.registry,
        )
        self.deliveries = Counter(
            "mammonode_deliveries",
            "Delivery attempts by destination and outcome",
            ["destination", "outcome"],
            registry=self.registry,
        )

    def attach_database(self, db) -> None:
        self.registry.register(_DatabaseCollector(db))

    def observe_job(self, timings: dict) -> None:
        for stage, seconds in timings.items():
            self.stage_seconds.labels(stage).observe(seconds)


class _DatabaseCollector:
    def __init__(self, db) -> None:
        self.db = db

    def collect(self):
        studies = GaugeMetricFamily("mammonode_studies", "Studies by state", labels=["state"])
        jobs = GaugeMetricFamily("mammonode_queue_depth", "Jobs by state", labels=["state"])
        deliveries = GaugeMetricFamily("mammonode_outbox", "Outbox rows by state", labels=["state"])
        heartbeat = GaugeMetricFamily(
            "mammonode_worker_heartbeat_age_seconds", "Seconds since each worker's last heartbeat", labels=["worker"]
        )
        try:
            with self.db.session() as session:
                for state, n in session.execute(select(Study.state, func.count()).group_by(Study.state)):
                    studies.add_metric([state], n)
                for state, n in session.execute(select(Job.state, func.count()).group_by(Job.state)):
                    jobs.add_metric([state], n)
                for state, n in session.execute(select(Delivery.state, func.count()).group_by(Delivery.state)):
                    deliveries.add_metric([state], n)
                now = utcnow()
                for worker in session.execute(select(Worker).where(Worker.stopped_at.is_(None))).scalars():
                    heartbeat.add_metric([worker.id], (now - worker.heartbeat_at).total_seconds())
        except Exception:  # a scrape must not fail because the database is busy
            pass
        yield from (studies, jobs, deliveries, heartbeat)


METRICS = NodeMetrics()

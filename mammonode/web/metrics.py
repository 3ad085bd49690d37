"""``/metrics`` for Prometheus: the process's counters (mammonode.metrics) and gauges read
from the database at scrape time, so they are right however many processes share it."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, select
from starlette.requests import Request
from starlette.responses import Response

from mammonode.db.models import Delivery, Job, Study, Worker, utcnow
from mammonode.db.session import Database
from mammonode.metrics import METRICS


class DatabaseCollector:
    def __init__(self, db: Database) -> None:
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


def attach_database(db: Database) -> None:
    METRICS.registry.register(DatabaseCollector(db))


def metrics(request: Request) -> Response:
    return Response(generate_latest(METRICS.registry), media_type=CONTENT_TYPE_LATEST)

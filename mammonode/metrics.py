"""Prometheus metrics of one node process (exposed at /metrics).

Counters and histograms kept in-process by the listeners, workers and senders; the gauges
read from the database at scrape time are added by the web layer (web/metrics.py).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class


def sop_class_label(uid: object) -> str:
    """A peer chooses the SOP Class UID it sends: as a label value it must come from a
    bounded set (each new value is a new time series kept for the life of the process), so
    anything but a storage SOP class the standard registers counts as "other"."""
    value = str(uid or "")
    return value if uid_to_service_class(value) is StorageServiceClass else "other"


class NodeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.instances = Counter(
            "mammonode_instances_received",
            "Instances received, by SOP class, outcome and listener",
            ["sop_class", "outcome", "listener"],
            registry=self.registry,
        )
        # Label values come from the config alone (rule names and the three actions).
        self.routed = Counter(
            "mammonode_instances_routed",
            "Instances received, by the routing rule ([[rules]]) they fell under and its action",
            ["rule", "action"],
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

    def observe_job(self, timings: dict) -> None:
        for stage, seconds in timings.items():
            self.stage_seconds.labels(stage).observe(seconds)


METRICS = NodeMetrics()

"""Prometheus metrics (prometheus-client), one registry per node.

Counters and histograms are fed by the stages through :class:`Metrics`; job
counts by state and the queue depth are read from the journal at scrape time,
so they are always the journal's truth, also after a restart.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

_STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 3600, 86400)


class _JournalCollector:
    def __init__(self, journal) -> None:
        self.journal = journal

    def collect(self):
        try:
            counts = self.journal.counts()
        except Exception:  # journal closed during shutdown
            return
        g = GaugeMetricFamily("dermnode_jobs", "Jobs in the journal by state", labels=["state"])
        for state, n in counts.items():
            g.add_metric([state], n)
        yield g
        q = GaugeMetricFamily("dermnode_queue_depth", "Jobs waiting to be processed or delivered")
        q.add_metric([], counts.get("received", 0) + counts.get("processing", 0) + counts.get("encoded", 0))
        yield q
        d = GaugeMetricFamily("dermnode_dead_letter_jobs", "Jobs in dead-letter, waiting for an operator")
        d.add_metric([], counts.get("dead", 0))
        yield d


class Metrics:
    def __init__(self, journal=None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.associations = Counter("dermnode_associations", "Associations handled by the SCP", ["outcome"], registry=r)
        self.images = Counter("dermnode_images_received", "C-STORE requests received, by outcome", ["outcome"], registry=r)
        self.stage = Histogram("dermnode_stage_seconds", "Processing latency by stage", ["stage"],
                               buckets=_STAGE_BUCKETS, registry=r)
        self.e2e = Histogram("dermnode_delivery_seconds", "From image received to all 4 results acknowledged",
                             buckets=_E2E_BUCKETS, registry=r)
        self.sent = Counter("dermnode_objects_sent", "Derived objects acknowledged by the destination", ["kind"], registry=r)
        self.retries = Counter("dermnode_send_retries", "Transient send failures scheduled for retry", registry=r)
        self.dead = Counter("dermnode_dead_lettered", "Jobs moved to dead-letter", ["stage"], registry=r)
        if journal is not None:
            r.register(_JournalCollector(journal))

    # Callbacks the stages call -----------------------------------------------
    def intake(self, outcome: str) -> None:
        self.images.labels(outcome).inc()

    def association(self, outcome: str) -> None:
        self.associations.labels(outcome).inc()

    def stages(self, **seconds: float) -> None:
        for name, value in seconds.items():
            self.stage.labels(name).observe(value)

    def outbox_event(self, name: str, **kw) -> None:
        if name == "sent":
            self.sent.labels(kw.get("kind", "?")).inc()
        elif name == "retry":
            self.retries.inc()
        elif name == "dead":
            self.dead.labels("send").inc()
        elif name == "done":
            if "latency" in kw:
                self.e2e.observe(kw["latency"])
            if "send_seconds" in kw:
                self.stage.labels("send").observe(kw["send_seconds"])

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""Prometheus metrics of the page server, built on a registry the caller chooses."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from remem_common.protocol.envelope import MALFORMED_REASONS, ProtocolError
from remem_common.security import AuthMetrics

OPS = ("put", "get", "delete", "inventory", "drop_slab", "push_slab", "receive_slab")
RESULTS = ("ok", "error")
# Page-server work is tens of microseconds; the library's default buckets start at 5 ms.
LATENCY_BUCKETS = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0, 10.0,
)  # fmt: skip


@dataclass(frozen=True)
class StoreGauges:
    """Current state read at scrape time from the store (no bookkeeping on the hot path)."""

    capacity_bytes: Callable[[], int]
    used_bytes: Callable[[], int]
    committed_bytes: Callable[[], int]
    pages: Callable[[], int]
    slabs: Callable[[], int]
    under_pressure: Callable[[], bool]


class _StoreCollector(Collector):
    def __init__(self, gauges: StoreGauges) -> None:
        self._gauges = gauges

    def collect(self) -> Iterator[GaugeMetricFamily]:
        g = self._gauges
        yield GaugeMetricFamily(
            "pageserver_capacity_bytes", "Bytes of RAM donated for pages", value=g.capacity_bytes()
        )
        yield GaugeMetricFamily(
            "pageserver_used_bytes", "Bytes of the capacity holding pages", value=g.used_bytes()
        )
        yield GaugeMetricFamily(
            "pageserver_arena_committed_bytes",
            "Host memory the arena file holds: used pages and the free slots of their regions",
            value=g.committed_bytes(),
        )
        yield GaugeMetricFamily("pageserver_pages_resident", "Pages stored", value=g.pages())
        yield GaugeMetricFamily("pageserver_slabs", "Slabs with at least one page", value=g.slabs())
        yield GaugeMetricFamily(
            "pageserver_under_pressure",
            "1 while the host needs its memory back (no new slabs taken)",
            value=1.0 if g.under_pressure() else 0.0,
        )


class PageServerMetrics:
    """Every metric the page server exports; label children created up front."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.auth = AuthMetrics(registry, "pageserver")
        self.requests = Counter(
            "pageserver_requests_total",
            "Requests handled, by operation and result",
            ["op", "result"],
            registry=registry,
        )
        self.duration = Histogram(
            "pageserver_request_duration_seconds",
            "Time to handle one request, by operation",
            ["op"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.malformed = Counter(
            "pageserver_malformed_messages_total",
            "Messages rejected as malformed, by reason",
            ["reason"],
            registry=registry,
        )
        self.pages_moved = Counter(
            "pageserver_pages_total",
            "Pages moved by data-plane operations, by direction",
            ["direction"],
            registry=registry,
        )
        self.push_sent_bytes = Counter(
            "pageserver_push_sent_bytes_total",
            "Page bytes this server pushed to peers (re-replication, drain)",
            registry=registry,
        )
        self.push_received_bytes = Counter(
            "pageserver_push_received_bytes_total",
            "Page bytes received from peers' pushes",
            registry=registry,
        )
        self.heartbeat_failures = Counter(
            "pageserver_heartbeat_failures_total",
            "Heartbeats to placement that got no answer in time",
            registry=registry,
        )
        self.ok = {op: self.requests.labels(op, "ok") for op in OPS}
        self.error = {op: self.requests.labels(op, "error") for op in OPS}
        self.latency = {op: self.duration.labels(op) for op in OPS}
        self.malformed_by = {reason: self.malformed.labels(reason) for reason in MALFORMED_REASONS}
        self.pages_in = self.pages_moved.labels("in")
        self.pages_out = self.pages_moved.labels("out")
        self._registry = registry

    def count_malformed(self, exc: ProtocolError) -> None:
        """Count a message refused as malformed on any of the server's sockets."""
        if exc.reason in MALFORMED_REASONS:
            self.malformed_by[exc.reason].inc()

    def watch_store(self, gauges: StoreGauges) -> None:
        """Export the store's current state, read at each scrape."""
        self._registry.register(_StoreCollector(gauges))

"""Prometheus metrics of the page server, built on a registry the caller chooses."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from remem_common.metrics import SUB_MS_BUCKETS, ServiceMetrics

OPS = ("put", "get", "delete", "inventory", "drop_slab", "push_slab", "receive_slab")
# Page-server work is tens of microseconds.
LATENCY_BUCKETS = SUB_MS_BUCKETS


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


class PageServerMetrics(ServiceMetrics):
    """Every metric the page server exports; label children created up front."""

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry, "pageserver", OPS)
        self.duration = Histogram(
            "pageserver_request_duration_seconds",
            "Time to handle one request, by operation",
            ["op"],
            buckets=LATENCY_BUCKETS,
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
        self.latency = {op: self.duration.labels(op) for op in OPS}
        self.pages_in = self.pages_moved.labels("in")
        self.pages_out = self.pages_moved.labels("out")

    def watch_store(self, gauges: StoreGauges) -> None:
        """Export the store's current state, read at each scrape."""
        self._registry.register(_StoreCollector(gauges))

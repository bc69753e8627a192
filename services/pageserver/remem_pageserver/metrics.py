"""Prometheus metrics of the page server, built on a registry the caller chooses.

The loop thread counts each request in plain numbers (`PageServerMetrics.record`), which
reach the prometheus_client metrics when they are scraped: an inc or observe of theirs
costs a lock and checks per call, i.e. microseconds a message with the cold caches of a
server woken for one request. The scrape output is the library's own, as before.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector
from remem_common.metrics import SUB_MS_BUCKETS, ServiceMetrics

OPS = ("put", "get", "delete", "inventory", "drop_slab", "push_slab", "receive_slab")
# Page-server work is tens of microseconds.
LATENCY_BUCKETS = SUB_MS_BUCKETS
# A tally (per operation, the loop thread's counts since start): requests that succeeded and
# failed (indexed by `failed`), seconds summed, then requests per latency bucket.
_OK, _FAILED, _SECONDS, _BUCKETS = 0, 1, 2, 3
_UPPER_BOUNDS = (*LATENCY_BUCKETS, float("inf"))


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


class _Tallied(Collector):
    """Metrics exported as the library exports them, after `flush` brought them up to date."""

    def __init__(self, metrics: Iterable[MetricWrapperBase], flush: Callable[[], None]) -> None:
        self._metrics = tuple(metrics)
        self._flush = flush

    def describe(self) -> Iterator[Metric]:
        for metric in self._metrics:
            yield from metric.describe()

    def collect(self) -> Iterator[Metric]:
        self._flush()
        for metric in self._metrics:
            yield from metric.collect()


class PageServerMetrics(ServiceMetrics):
    """Every metric the page server exports; label children created up front."""

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry, "pageserver", OPS)
        self.duration = Histogram(
            "pageserver_request_duration_seconds",
            "Time to handle one request, by operation",
            ["op"],
            buckets=LATENCY_BUCKETS,
            registry=None,
        )
        self.pages_moved = Counter(
            "pageserver_pages_total",
            "Pages moved by data-plane operations, by direction",
            ["direction"],
            registry=None,
        )
        # The metrics `record` and `pages_tally` feed, in the order they were registered in.
        registry.unregister(self.requests)
        registry.unregister(self.malformed)
        registry.register(
            _Tallied((self.requests, self.malformed, self.duration, self.pages_moved), self.flush)
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
        # Written by the loop thread alone; `flush` (any scraping thread) only reads them.
        self.tallies: dict[str, list[float]] = {
            op: [0, 0, 0.0] + [0] * len(_UPPER_BOUNDS) for op in OPS
        }
        self.pages_tally = [0, 0]  # pages in (stored), pages out (read)
        self._flushed = {op: list(tally) for op, tally in self.tallies.items()}
        self._pages_flushed = [0, 0]
        self._flush_lock = threading.Lock()

    def record(self, op: str, failed: bool, seconds: float) -> None:
        """Count one request of `op` that took `seconds` (from the loop thread)."""
        tally = self.tallies[op]
        tally[failed] += 1
        tally[_SECONDS] += seconds
        tally[_BUCKETS + bisect_left(_UPPER_BOUNDS, seconds)] += 1

    def flush(self) -> None:
        """Add what was tallied since the last flush to the prometheus_client metrics."""
        with self._flush_lock:
            for op, tally in self.tallies.items():
                now, before = list(tally), self._flushed[op]
                if now == before:
                    continue
                self._flushed[op] = now
                self.ok[op].inc(now[_OK] - before[_OK])
                self.error[op].inc(now[_FAILED] - before[_FAILED])
                # The library takes one observation at a time: its histogram's sum and
                # bucket values (private; test_pageserver_metrics.py compares the scrape
                # with observe's) are added to directly.
                histogram = self.latency[op]
                histogram._sum.inc(now[_SECONDS] - before[_SECONDS])
                for bucket, count in enumerate(now[_BUCKETS:]):
                    if count != before[_BUCKETS + bucket]:
                        histogram._buckets[bucket].inc(count - before[_BUCKETS + bucket])
            pages = list(self.pages_tally)
            self.pages_in.inc(pages[0] - self._pages_flushed[0])
            self.pages_out.inc(pages[1] - self._pages_flushed[1])
            self._pages_flushed = pages

    def watch_store(self, gauges: StoreGauges) -> None:
        """Export the store's current state, read at each scrape."""
        self._registry.register(_StoreCollector(gauges))

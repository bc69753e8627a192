"""Prometheus metrics of the mirror, built on a registry the caller chooses."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from remem_common.metrics import SUB_MS_BUCKETS, ServiceMetrics

OPS = (
    "describe",
    "attach",
    "detach",
    "write",
    "read",
    "trim",
    "mark_replicated",
    "list_unreplicated",
)
# An O_DIRECT write of a few pages or an fdatasync on an SSD takes tens to hundreds of
# microseconds.
IO_BUCKETS = SUB_MS_BUCKETS


@dataclass(frozen=True)
class MirrorGauges:
    """Current state read at scrape time (no bookkeeping on the hot path)."""

    pending_pages: Callable[[], int]
    write_lag_seconds: Callable[[], float]
    unreplicated_pages: Callable[[], int]
    page_count: Callable[[], int]
    direct_io: Callable[[], bool]
    clean: Callable[[], bool]


class _StateCollector(Collector):
    def __init__(self, gauges: MirrorGauges) -> None:
        self._gauges = gauges

    def collect(self) -> Iterator[GaugeMetricFamily]:
        g = self._gauges
        yield GaugeMetricFamily(
            "mirror_pending_pages",
            "Written pages queued or being written, not yet on disk",
            value=g.pending_pages(),
        )
        yield GaugeMetricFamily(
            "mirror_write_lag_seconds",
            "Age of the oldest write not yet on disk (0 when none is queued)",
            value=g.write_lag_seconds(),
        )
        yield GaugeMetricFamily(
            "mirror_unreplicated_pages",
            "Pages held by the mirror only, to resync to the page servers",
            value=g.unreplicated_pages(),
        )
        yield GaugeMetricFamily(
            "mirror_pages", "Pages of the mirrored device", value=g.page_count()
        )
        yield GaugeMetricFamily(
            "mirror_clean",
            "1 if the last client session ended cleanly and none is open (see attach_mirror)",
            value=1.0 if g.clean() else 0.0,
        )
        yield GaugeMetricFamily(
            "mirror_direct_io",
            "1 if the mirror writes with O_DIRECT, 0 if it fell back to buffered I/O",
            value=1.0 if g.direct_io() else 0.0,
        )


class MirrorMetrics(ServiceMetrics):
    """Every metric the mirror exports; label children created up front."""

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry, "mirror", OPS)
        self.written_bytes = Counter(
            "mirror_written_bytes_total", "Page bytes written to the device", registry=registry
        )
        self.read_bytes = Counter(
            "mirror_read_bytes_total", "Page bytes read from the device", registry=registry
        )
        self.write_requests = Counter(
            "mirror_write_requests_total",
            "Write requests executed (compare mirror_coalesced_writes_total)",
            registry=registry,
        )
        self.coalesced_writes = Counter(
            "mirror_coalesced_writes_total",
            "Writes issued to the device, one per run: adjacent queued writes share one",
            registry=registry,
        )
        self.write_duration = Histogram(
            "mirror_write_duration_seconds",
            "Time of one batch of writes to the device (a group's runs, issued together)",
            buckets=IO_BUCKETS,
            registry=registry,
        )
        self.fsync_duration = Histogram(
            "mirror_fsync_duration_seconds",
            "Time of one fdatasync of the device",
            buckets=IO_BUCKETS,
            registry=registry,
        )

    def watch(self, gauges: MirrorGauges) -> None:
        """Export the mirror's current state, read at each scrape."""
        self._registry.register(_StateCollector(gauges))

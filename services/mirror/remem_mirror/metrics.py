"""Prometheus metrics of the mirror, built on a registry the caller chooses."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from remem_common.protocol.envelope import MALFORMED_REASONS
from remem_common.security import AuthMetrics

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
RESULTS = ("ok", "error")
# An O_DIRECT write of a few pages or an fdatasync on an SSD takes tens to hundreds of
# microseconds; the library's default buckets start at 5 ms.
IO_BUCKETS = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0, 10.0,
)  # fmt: skip


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


class MirrorMetrics:
    """Every metric the mirror exports; label children created up front."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.auth = AuthMetrics(registry, "mirror")
        self.requests = Counter(
            "mirror_requests_total",
            "Requests handled, by operation and result",
            ["op", "result"],
            registry=registry,
        )
        self.malformed = Counter(
            "mirror_malformed_messages_total",
            "Messages rejected as malformed, by reason",
            ["reason"],
            registry=registry,
        )
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
            "Write syscalls issued; adjacent queued writes share one",
            registry=registry,
        )
        self.write_duration = Histogram(
            "mirror_write_duration_seconds",
            "Time of one write syscall (a run of adjacent pages)",
            buckets=IO_BUCKETS,
            registry=registry,
        )
        self.fsync_duration = Histogram(
            "mirror_fsync_duration_seconds",
            "Time of one fdatasync of the device",
            buckets=IO_BUCKETS,
            registry=registry,
        )
        self.ok = {op: self.requests.labels(op, "ok") for op in OPS}
        self.error = {op: self.requests.labels(op, "error") for op in OPS}
        self.malformed_by = {reason: self.malformed.labels(reason) for reason in MALFORMED_REASONS}
        self._registry = registry

    def watch(self, gauges: MirrorGauges) -> None:
        """Export the mirror's current state, read at each scrape."""
        self._registry.register(_StateCollector(gauges))

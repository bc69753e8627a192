"""Prometheus metrics of placement, built on a registry the caller chooses."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from remem_common.metrics import ServiceMetrics
from remem_common.protocol.admin_placement import SERVER_STATES

OPS = ("register", "heartbeat", "allocate", "get_map", "report_failure", "status", "drain")
SLAB_STATES = ("healthy", "degraded", "lost")
# An allocation is a sort over a handful of servers: tens of microseconds.
ALLOCATION_BUCKETS = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005, 0.01, 0.1, 1.0,
)  # fmt: skip
# A slab push moves up to 64 MiB between page servers: tens of ms to seconds.
PUSH_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass(frozen=True)
class StateGauges:
    """Current state read at scrape time from the cluster."""

    servers: Callable[[], dict[str, int]]
    slabs: Callable[[], dict[str, int]]
    epoch: Callable[[], int]


class _StateCollector(Collector):
    def __init__(self, gauges: StateGauges) -> None:
        self._gauges = gauges

    def collect(self) -> Iterator[GaugeMetricFamily]:
        servers = GaugeMetricFamily(
            "placement_pageservers", "Page servers known, by state", labels=["state"]
        )
        counts = self._gauges.servers()
        for state in SERVER_STATES:
            servers.add_metric([state], counts.get(state, 0))
        yield servers
        slabs = GaugeMetricFamily("placement_slabs", "Slabs in the map, by state", labels=["state"])
        slab_counts = self._gauges.slabs()
        for slab_state in SLAB_STATES:
            slabs.add_metric([slab_state], slab_counts.get(slab_state, 0))
        yield slabs
        yield GaugeMetricFamily(
            "placement_map_epoch", "Current slab-map epoch", value=self._gauges.epoch()
        )


class PlacementMetrics(ServiceMetrics):
    """Every metric placement exports; label children created up front."""

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry, "placement", OPS)
        self.allocation_duration = Histogram(
            "placement_allocation_duration_seconds",
            "Time to answer one allocate_slab_request",
            buckets=ALLOCATION_BUCKETS,
            registry=registry,
        )
        self.rereplication_bytes = Counter(
            "placement_rereplication_bytes_total",
            "Page bytes page servers copied to each other on placement's orders",
            registry=registry,
        )
        self.rereplication_duration = Histogram(
            "placement_rereplication_duration_seconds",
            "Time from ordering a slab push to its completion",
            buckets=PUSH_BUCKETS,
            registry=registry,
        )
        self.pushes = Counter(
            "placement_slab_pushes_total",
            "Slab pushes ordered, by result",
            ["result"],
            registry=registry,
        )
        self.message_bytes = Counter(
            "placement_message_bytes_total",
            "Bytes of every message placement received or sent on its ZeroMQ sockets",
            ["direction"],
            registry=registry,
        )
        self.utilization_errors = Counter(
            "placement_utilization_errors_total",
            "Failed metric scrapes or Prometheus queries",
            registry=registry,
        )
        self.planning_rounds = Counter(
            "placement_planning_rounds_total",
            "Repair planning rounds run (each looks at every slab for missing or leaving "
            "replicas); none run during the restart grace",
            registry=registry,
        )
        self.push_ok = self.pushes.labels("ok")
        self.push_failed = self.pushes.labels("failed")
        self.bytes_in = self.message_bytes.labels("in")
        self.bytes_out = self.message_bytes.labels("out")

    def watch(self, gauges: StateGauges) -> None:
        """Export the cluster's current state, read at each scrape."""
        self._registry.register(_StateCollector(gauges))

"""Assemble the remote backend: placement link, page server links, and their metrics.

Kept apart from `server.py` so the NBD service stays transport-agnostic: `open_remote`
returns a `Backend` whose `close()` also closes the placement link and the ZeroMQ context.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import zmq
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from remem_client.placement_client import PlacementClient
from remem_client.remote_backend import RemoteBackend

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from remem_client.config import ClientConfig


class _RemoteCollector(Collector):
    """Replica and placement state, read at scrape time (plain ints on the hot path)."""

    def __init__(self, backend: RemoteBackend, placement: PlacementClient) -> None:
        self._backend = backend
        self._placement = placement

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        stats = self._backend.stats
        yield CounterMetricFamily(
            "client_replica_failovers_total",
            "Reads that moved on to another replica (error, timeout, missing or bad page)",
            value=stats.failovers,
        )
        yield CounterMetricFamily(
            "client_replica_failures_total",
            "Requests a replica failed (error or timeout), reported to placement",
            value=stats.replica_failures,
        )
        pages = CounterMetricFamily(
            "client_pages_total", "Pages moved by the remote backend", labels=["kind"]
        )
        pages.add_metric(["read_remote"], stats.pages_read_remote)
        pages.add_metric(["read_zero"], stats.pages_read_zero)
        pages.add_metric(["written"], stats.pages_written)
        yield pages
        yield GaugeMetricFamily(
            "client_location_metadata_bytes",
            "Client memory holding page locations (written-page bitmap and slab map)",
            value=self._backend.metadata_bytes(),
        )
        yield GaugeMetricFamily(
            "client_map_epoch", "Epoch of the slab map last applied", value=self._placement.epoch
        )
        yield GaugeMetricFamily(
            "client_degraded_slabs",
            "Slabs of this volume with fewer replicas than asked for",
            value=len(self._placement.degraded),
        )


async def open_remote(config: ClientConfig, registry: CollectorRegistry) -> RemoteBackend:
    """Connect to placement, adopt the volume's current map, and return the backend."""
    assert config.placement is not None  # the config validator requires it for "remote"
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    placement = PlacementClient(
        config.placement,
        tenant=config.tenant,
        volume=config.volume,
        replicas=config.replicas,
        context=context,
        timeout=config.placement_timeout,
        poll_interval=config.map_poll_interval,
    )
    backend = RemoteBackend(
        size=int(config.size),
        tenant=config.tenant,
        volume=config.volume,
        placement=placement,
        context=context,
        replica_timeout=config.replica_timeout,
    )

    async def close_links() -> None:
        await placement.close()
        context.destroy(linger=0)

    backend.on_close.append(close_links)
    await placement.start(backend)
    registry.register(_RemoteCollector(backend, placement))
    return backend

"""Helpers of the placement suites: start placement, fill slabs, read metrics, wait for state.

Kept out of tests/conftest.py so the placement suites add no shared fixtures; each suite
builds its `placement` fixture from `PlacementProcesses`.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import TypeVar

import numpy as np
from remem_common.pageserver_client import PageServerClient
from remem_common.placement_requests import BlockingPlacementClient
from remem_common.protocol.admin_placement import GetStatusReply
from remem_common.protocol.pages import PAGE_SIZE, make_keys
from remem_common.testing import ServiceProcess, scrape_metrics, start_service

T = TypeVar("T")

# Scaled-down policy for small test arenas: a server needs 16 MiB free to take a slab and
# each slab placed counts 16 MiB against it until the next metric sample. The tests write
# pages directly (no client polls the map), so pushes wait only 0.3 s for clients.
FAST = [
    "--min-free", "16MiB",
    "--alloc-reserve", "16MiB",
    "--scrape-interval", "0.5",
    "--restart-grace", "0.5",
    "--map-settle", "0.3",
]  # fmt: skip


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (for a fixed --listen across restarts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PlacementProcesses:
    """Starts placement processes; `stop_all` stops every one still running."""

    def __init__(self) -> None:
        self.started: list[ServiceProcess] = []

    def start(self, extra: list[str] | None = None, *, port: int = 0) -> ServiceProcess:
        args = [
            "placement",
            "--listen", f"tcp://127.0.0.1:{port}",
            "--metrics-port", "0",
            "--heartbeat-interval", "0.25",
        ]  # fmt: skip
        service = start_service("placement", args + (extra if extra is not None else FAST))
        self.started.append(service)
        return service

    def stop_all(self) -> None:
        for service in self.started:
            if service.proc.poll() is None:
                service.stop()


def wait_until(what: str, check: Callable[[], T | None], timeout: float = 15.0) -> T:
    """Poll `check` (every 50 ms) until it returns something truthy; fail after `timeout`.

    Polls state that changes asynchronously (a death being detected, a push finishing);
    readiness of processes is never waited for this way (see start_service).
    """
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def scrape(service: ServiceProcess) -> dict[str, float]:
    """Samples of the service's /metrics as {'name{labels}': value}."""
    return scrape_metrics(service.ready["metrics"])


def status_of(placement: ServiceProcess) -> GetStatusReply:
    with BlockingPlacementClient(placement.ready["endpoint"]) as client:
        return client.status()


def wait_registered(placement: ServiceProcess, ids: set[str], timeout: float = 20.0) -> None:
    """Until placement knows every server in `ids` live, with a metrics sample of each."""

    def ready() -> bool:
        status = status_of(placement)
        seen = {
            s.server_id
            for s in status.servers
            if s.state in ("live", "pressure") and s.utilization_from == "metrics"
        }
        return ids <= seen and not status.in_grace

    wait_until(f"servers {sorted(ids)} registered and sampled", ready, timeout)


def pages_of(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, PAGE_SIZE), dtype=np.uint8)


def write_slab(
    endpoints: list[str], tenant: str, volume: int, slab: int, count: int, seed: int
) -> np.ndarray:
    """Write pages 0..count-1 of a slab to every endpoint (as a client writes all replicas)."""
    data = pages_of(count, seed)
    for endpoint in endpoints:
        with PageServerClient(endpoint) as client:
            for start in range(0, count, 1024):
                stop = min(count, start + 1024)
                keys = make_keys([slab] * (stop - start), range(start, stop))
                assert client.put(tenant, volume, keys, data[start:stop]) == stop - start
    return data


def read_slab(endpoint: str, tenant: str, volume: int, slab: int, count: int) -> np.ndarray:
    """Pages 0..count-1 of a slab from one server; every one must be present."""
    out = np.empty((count, PAGE_SIZE), dtype=np.uint8)
    with PageServerClient(endpoint) as client:
        for start in range(0, count, 1024):
            stop = min(count, start + 1024)
            found, _, data = client.get(
                tenant, volume, make_keys([slab] * (stop - start), range(start, stop))
            )
            assert found.all(), f"slab {slab} pages missing on {endpoint}"
            out[start:stop] = data
    return out


def fill(endpoint: str, megabytes: int, tenant: str = "filler") -> None:
    """Occupy `megabytes` of a page server with junk pages (volume 999)."""
    pages = megabytes * 256
    for slab in range(0, (pages + 16383) // 16384):
        count = min(16384, pages - slab * 16384)
        write_slab([endpoint], tenant, 999, slab, count, seed=slab)

"""`--utilization-source prometheus` against a real Prometheus server scraping page servers."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from remem_common.placement_requests import BlockingPlacementClient

from ..conftest import StartPageServer
from .placement_support import (
    PlacementProcesses,
    fill,
    free_port,
    scrape,
    status_of,
    wait_registered,
    wait_until,
)

PROMETHEUS = shutil.which("prometheus")
MiB = 1 << 20

pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="Debian's prometheus not installed")


@pytest.fixture
def placements() -> Iterator[PlacementProcesses]:
    processes = PlacementProcesses()
    yield processes
    processes.stop_all()


class Prometheus:
    """A Prometheus server on loopback scraping the given targets every second."""

    def __init__(self, tmp: Path, targets: list[str]) -> None:
        self.port = free_port()  # prometheus refuses port 0
        self.url = f"http://127.0.0.1:{self.port}"
        config = tmp / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
            "scrape_configs:\n  - job_name: pageserver\n    static_configs:\n"
            f"      - targets: {json.dumps(targets)}\n"
        )
        self.log = (tmp / "prometheus.log").open("w")
        assert PROMETHEUS is not None
        self.proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def query(self, expr: str) -> list[dict[str, object]]:
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                body = json.loads(response.read())
        except (urllib.error.URLError, ConnectionError):
            return []  # not listening yet
        result: list[dict[str, object]] = body["data"]["result"]
        return result

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.log.close()


def test_utilization_from_the_prometheus_http_api(
    placements: PlacementProcesses, start_pageserver: StartPageServer, tmp_path: Path
) -> None:
    # The page servers start before placement so Prometheus can be told their metrics
    # ports; they register as soon as placement comes up on the port they were given.
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    servers = {
        name: start_pageserver(
            name=name, capacity="96MiB", extra=["--placement", endpoint, "--zone", name]
        )
        for name in ("p1", "p2")
    }
    fill(servers["p1"].ready["endpoint"], 40)
    targets = [s.ready["metrics"].split("/")[2] for s in servers.values()]
    prometheus = Prometheus(tmp_path, targets)
    try:
        wait_until(
            "Prometheus to have scraped both page servers",
            lambda: len(prometheus.query("pageserver_used_bytes")) == 2,
            timeout=30,
        )
        placement = placements.start(
            [
                "--utilization-source", "prometheus",
                "--prometheus-url", prometheus.url,
                "--scrape-interval", "0.5",
                "--min-free", "16MiB",
                "--alloc-reserve", "16MiB",
                "--restart-grace", "0.5",
                # p1's filler pages are in its inventory: adopted as slabs with one replica
                # target, not re-replicated onto p2.
                "--replicas", "1",
            ],
            port=port,
        )  # fmt: skip
        wait_registered(placement, {"p1", "p2"})
        used = {s.server_id: s.used_bytes for s in status_of(placement).servers}
        # The page servers' own gauges, as Prometheus stored them.
        assert used["p1"] == 40 * MiB and used["p2"] == 0
        with BlockingPlacementClient(placement.ready["endpoint"]) as client:
            # p2 has 96 MiB free, p1 56: slabs go to p2 until its reservations (16 MiB per
            # slab, kept until Prometheus holds a sample newer than the allocation) make it
            # look fuller than p1: 80, 64, 48 < 56.
            picks = [client.allocate("t", 0, n, replicas=1).replicas[0].server_id for n in range(4)]
        assert picks == ["p2", "p2", "p2", "p1"]
        assert scrape(placement)["placement_utilization_errors_total"] == 0
    finally:
        prometheus.stop()

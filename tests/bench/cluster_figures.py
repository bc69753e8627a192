"""Figures of `make bench` that are not fio rows: the client's location metadata, the
failover stall and re-replication rate (on the table's k=2 `remem up`), and the page
server's RAM overhead (remem_pageserver.bench).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from remem_client.bench_nbd import MIX_READ_PERCENT, Server
from remem_common.local_cluster import read_cluster
from remem_common.placement_requests import (
    BlockingPlacementClient,
    PlacementRequestError,
    PlacementRequestTimeout,
)
from remem_common.protocol.admin_placement import GetStatusReply
from remem_common.protocol.pages import PAGE_SIZE
from remem_common.testing import scrape_metrics

from ..faults.cluster import max_latency_seconds, start_fio, wait_until

GiB = 1 << 30
# Placement's status is polled this often while it re-replicates: the copy window is known
# to within about two polls (see `failover`).
STATUS_POLL_S = 0.02
READS_OK = 'client_nbd_requests_total{cmd="read",result="ok"}'


def state_dir(server: Server) -> Path:
    """The state folder of a `remem up` started by bench_nbd.start_remem."""
    assert server.pid_dir is not None, f"{server.name} is not a remem up"
    return server.pid_dir.parent


def metrics_url(server: Server, job: str) -> str:
    """The metrics endpoint of the (first) process of `job` (e.g. remem-client), from the
    Prometheus targets file `remem up` writes."""
    groups = json.loads((state_dir(server) / "prometheus-targets.json").read_text())
    for group in groups:
        if group["labels"]["job"] == job:
            return f"http://{group['targets'][0]}/metrics"
    raise RuntimeError(f"{server.name} lists no {job} target")


def client_metadata(server: Server, device_bytes: int) -> dict[str, float]:
    """Client memory holding page locations (client_location_metadata_bytes) per GiB of
    device, with the pages written so far."""
    metrics = scrape_metrics(metrics_url(server, "remem-client"))
    held = metrics["client_location_metadata_bytes"]
    return {
        "bytes": held,
        "device_bytes": device_bytes,
        "bytes_per_gib": held / (device_bytes / GiB),
    }


def failover(server: Server, region: str, runtime: float, timeout: float = 120) -> dict[str, Any]:
    """SIGKILL the page server holding the most slabs while fio runs the 4 KiB mixed
    workload of the table (randrw, QD8) for `runtime` seconds; then follow placement until
    every slab has k live replicas again.

    Returns the longest fio request of the run (the stall), its p99, placement's time to
    declare the server dead, and the re-replication: bytes copied and the wall time from the
    last status poll before any copy began to the first that saw them all done (at most two
    polls, ~2 x STATUS_POLL_S, longer than the copy itself, so the MB/s is a lower bound).
    """
    assert server.pid_dir is not None
    client_url = metrics_url(server, "remem-client")
    with BlockingPlacementClient(
        read_cluster(state_dir(server)).placement, timeout=2.0
    ) as placement:
        before = placement.status()
        victim = max((s for s in before.servers if s.state == "live"), key=lambda s: s.slabs)
        pid = int((server.pid_dir / f"{victim.server_id}.pid").read_text())
        reads_before = scrape_metrics(client_url)[READS_OK]
        run = start_fio(
            server.uri,
            "--name=failover", "--rw=randrw", f"--rwmixread={MIX_READ_PERCENT}", "--bs=4k",
            "--iodepth=8", f"--size={region}", "--time_based", f"--runtime={runtime}",
        )  # fmt: skip
        # Kill once fio is well under way (its reads reach the client), early enough that
        # most of its run falls after the kill.
        wait_until(
            "fio reading through the client",
            lambda: scrape_metrics(client_url)[READS_OK] > reads_before + 2000,
            30,
        )
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        timeline = follow_rereplication(placement, before, victim.server_id, killed, timeout)
        report = run.wait(timeout=runtime + 120)
    job = report["jobs"][0]
    p99 = max(
        job[side]["clat_ns"]["percentile"]["99.000000"]
        for side in ("read", "write")
        if job[side]["total_ios"]
    )
    return {
        "victim": victim.server_id,
        "victim_slabs": victim.slabs,
        "fio_seconds": runtime,
        "fio_iops": job["read"]["iops"] + job["write"]["iops"],
        "stall_ms": max_latency_seconds(report) * 1000,
        "p99_ms": p99 / 1e6,
        **timeline,
    }


def follow_rereplication(
    placement: BlockingPlacementClient,
    before: GetStatusReply,
    victim: str,
    killed: float,
    timeout: float,
) -> dict[str, float]:
    """Poll placement's status until `victim` is dead and every slab is whole again."""
    dead_at = 0.0
    idle_at = killed  # the last poll at which nothing had been copied or was copying
    done_at = 0.0
    copied = 0
    while time.monotonic() - killed < timeout:
        try:
            status = placement.status()
        except (PlacementRequestTimeout, PlacementRequestError):
            continue  # a busy placement: ask again
        now = time.monotonic()
        states = {s.server_id: s.state for s in status.servers}
        if not dead_at and states.get(victim, "dead") == "dead":
            dead_at = now
        copied = status.rereplicated_bytes - before.rereplicated_bytes
        if not copied and not any(push.copying for push in status.pushes):
            idle_at = now
        if dead_at and copied and not status.pushes and not status.degraded:
            done_at = now
            break
        time.sleep(STATUS_POLL_S)
    if not done_at:
        raise RuntimeError(f"slabs not re-replicated {timeout}s after {victim} was killed")
    copy_s = done_at - idle_at
    return {
        "detect_s": dead_at - killed,
        "rereplicated_bytes": copied,
        "copy_s": copy_s,
        "rereplication_mbps": copied / copy_s / 1e6,
        "whole_again_s": done_at - killed,
    }


def pageserver_bench(pages: int) -> dict[str, Any]:
    """remem_pageserver.bench with `pages` pages, plaintext (as `remem up` runs over Unix
    sockets), on an arena of its own; its JSON figures plus the overhead beyond the idle
    process (`marginal_overhead_pct`: what each stored page costs beyond its 4 KiB)."""
    shm = Path(f"/dev/shm/remem-bench-suite-{os.getpid()}.arena")
    env = {**os.environ, "BENCH_PAGES": str(pages), "BENCH_CURVE": "0", "BENCH_SHM": str(shm)}
    try:
        out = subprocess.run(
            [sys.executable, "-m", "remem_pageserver.bench"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=1200,
        ).stdout
    finally:
        with contextlib.suppress(FileNotFoundError):
            shm.unlink()
    figures: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    page_bytes = pages * PAGE_SIZE
    beyond_idle = figures["rss_full_bytes"] - figures["rss_idle_bytes"] - page_bytes
    figures["marginal_overhead_pct"] = 100 * beyond_idle / page_bytes
    return figures

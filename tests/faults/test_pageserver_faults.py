"""Scenarios 1 and 2: page servers SIGKILLed (one under load, then a second once placement
restored two replicas) and a page server paused with SIGSTOP (slow, not dead). No mirror
runs here, so every byte read back comes from page servers: a lost page is an error, not a
page quietly served from the local disk.
"""

from __future__ import annotations

import signal
import time
from typing import Any

import pytest

from .cluster import (
    FIO_SPREAD,
    FIO_SPREAD_BYTES,
    REPLICA_TIMEOUT,
    FaultCluster,
    assert_replicas_identical,
    fio,
    max_latency_seconds,
    start_fio,
    verified_bytes,
    wait_until,
)
from .conftest import MakeCluster

pytestmark = pytest.mark.faults


def test_two_page_servers_sigkilled_one_after_the_other_lose_nothing(
    make_cluster: MakeCluster,
) -> None:
    cluster = make_cluster(pageservers=4)
    run = start_fio(cluster.uri, *FIO_SPREAD, "--do_verify=1")
    # Kill the first victim once all four slabs are placed and fio is writing them.
    wait_until("fio to place all four slabs", lambda: len(cluster.slab_map().slabs) == 4, 60)
    assert run.running()
    first = max(cluster.holders().items(), key=lambda item: len(item[1]))[0]
    cluster.pageservers[first].kill(signal.SIGKILL)
    report = run.wait()
    assert verified_bytes(report) == FIO_SPREAD_BYTES

    # Re-replication restores two live replicas of every slab; then all data verifies again.
    wait_not_live(cluster, first)
    after_first = cluster.wait_fully_replicated(slabs=4)
    assert first not in after_first.servers
    report = fio(cluster.uri, *FIO_SPREAD, "--verify_only=1")
    assert verified_bytes(report) == FIO_SPREAD_BYTES

    # A second server dies, under a verifying read load; the slabs it held have their only
    # other copy on servers that were re-replicated to or survived the first death.
    second = max(cluster.holders().items(), key=lambda item: len(item[1]))[0]
    run = start_fio(cluster.uri, *FIO_SPREAD, "--verify_only=1")
    cluster.pageservers[second].kill(signal.SIGKILL)
    assert verified_bytes(run.wait()) == FIO_SPREAD_BYTES
    wait_not_live(cluster, second)
    after_second = cluster.wait_fully_replicated(slabs=4)
    assert {first, second}.isdisjoint(after_second.servers)
    # Placement lists the two survivors as the holders of everything...
    assert len(after_second.servers) == 2
    report = fio(cluster.uri, *FIO_SPREAD, "--verify_only=1")
    assert verified_bytes(report) == FIO_SPREAD_BYTES
    metrics = cluster.client_metrics()
    assert metrics["client_replica_failures_total"] >= 1
    assert cluster.nbd_errors() == 0


def wait_not_live(cluster: FaultCluster, server_id: str) -> None:
    """Until placement no longer counts a killed page server live. The client fails over the
    moment its connection drops, so a read load can finish before placement's dead_after:
    the map read then would still show the dead server holding its slabs."""
    wait_until(
        f"placement to stop counting {server_id} live",
        lambda: all(
            s.state != "live" for s in cluster.status().servers if s.server_id == server_id
        ),
        30,
    )


def writes_done(cluster: FaultCluster) -> float:
    return cluster.client_metrics()['client_nbd_requests_total{cmd="write",result="ok"}']


def check_latency(report: dict[str, Any], what: str, seconds: float) -> None:
    assert verified_bytes(report) == FIO_SPREAD_BYTES
    worst = max_latency_seconds(report)
    # A request that hits the paused server waits one replica timeout, then the server is
    # skipped for a while: a few timeouts at most, never a stall.
    assert worst < 6 * REPLICA_TIMEOUT, f"{what}: slowest I/O took {worst:.2f}s"
    print(f"{what}: slowest I/O {worst:.3f}s, rewrite and verify {seconds:.1f}s")


def short_pause(cluster: FaultCluster, slow: str, seed: int) -> None:
    """`slow` stalls for 1 s in the middle of a rewrite: shorter than placement's dead_after
    (1.5 s), so it stays a replica and must end up with every write it was sent."""
    run = start_fio(cluster.uri, *FIO_SPREAD, f"--randseed={seed}", "--do_verify=1")
    before = writes_done(cluster)
    wait_until("the rewrite to get going", lambda: writes_done(cluster) > before + 64, 30)
    cluster.pageservers[slow].kill(signal.SIGSTOP)
    try:
        time.sleep(1.0)  # the fault itself: a 1 s stall, not a wait for a condition
    finally:
        cluster.pageservers[slow].kill(signal.SIGCONT)
    check_latency(run.wait(), f"{slow} paused 1 s", time.monotonic() - run.started)
    assert run.running() is False


def long_pause(cluster: FaultCluster, slow: str, seed: int) -> None:
    """`slow` stalls until placement declares it dead, through a whole rewrite."""
    cluster.pageservers[slow].kill(signal.SIGSTOP)
    try:

        def declared_dead() -> bool:
            return any(s.server_id == slow and s.state == "dead" for s in cluster.status().servers)

        wait_until(f"placement to declare {slow} dead", declared_dead, 15)
        started = time.monotonic()
        report = fio(cluster.uri, *FIO_SPREAD, f"--randseed={seed}", "--do_verify=1")
        check_latency(report, f"{slow} paused, dead", time.monotonic() - started)
    finally:
        cluster.pageservers[slow].kill(signal.SIGCONT)


def test_a_paused_page_server_is_failed_over_within_the_replica_timeout(
    make_cluster: MakeCluster,
) -> None:
    cluster = make_cluster(pageservers=3)
    fio(cluster.uri, *FIO_SPREAD, "--do_verify=1")
    cluster.wait_fully_replicated(slabs=4)
    slow = max(cluster.holders().items(), key=lambda item: len(item[1]))[0]

    # A short pause (shorter than placement's dead_after) and a long one
    # (declared dead, re-replicated while paused). After each, the server is back: if it
    # stayed a replica it must hold every write it missed while paused, if it was declared
    # dead its copies are dropped and re-replicated. Either way all replicas of a slab hold
    # the same bytes, and the data set verifies.
    for seed, pause in ((7, short_pause), (8, long_pause)):
        pause(cluster, slow, seed)
        cluster.wait_fully_replicated(slabs=4)
        report = fio(cluster.uri, *FIO_SPREAD, f"--randseed={seed}", "--verify_only=1")
        assert verified_bytes(report) == FIO_SPREAD_BYTES
        wait_until(
            "no write in flight to any replica",
            lambda: cluster.client_metrics()["client_nbd_inflight_requests"] == 0,
            10,
        )
        assert_replicas_identical(cluster, pages=FIO_SPREAD_BYTES // 4 // 4096)
    assert cluster.nbd_errors() == 0

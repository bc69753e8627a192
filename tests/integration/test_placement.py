"""Placement as a real process with real page servers: who gets a slab and why, bad input.

Its sockets' fuzzers are in test_zmq_fuzz.py with every other service's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest
import zmq
from remem_common.placement_requests import BlockingPlacementClient, PlacementRequestError
from remem_common.protocol.client_placement import (
    MapChangedNotice,
    map_topic,
)
from remem_common.protocol.envelope import ErrorCode
from remem_common.testing import ServiceProcess

from ..conftest import StartPageServer
from .placement_support import (
    FAST,
    PlacementProcesses,
    fill,
    scrape,
    status_of,
    wait_registered,
    wait_until,
)

MiB = 1 << 20
HUGE_RESERVE = "1PiB"  # more than any host's MemAvailable: the server reports pressure


@pytest.fixture
def placements() -> Iterator[PlacementProcesses]:
    processes = PlacementProcesses()
    yield processes
    processes.stop_all()


def ps_args(placement: ServiceProcess, zone: str, *extra: str) -> list[str]:
    return ["--placement", placement.ready["endpoint"], "--zone", zone, *extra]


def used_mib(placement: ServiceProcess, server_id: str) -> float:
    status = status_of(placement)
    return next(s.used_bytes for s in status.servers if s.server_id == server_id) / MiB


def test_allocation_follows_free_memory_and_zones(
    placements: PlacementProcesses, start_pageserver: StartPageServer
) -> None:
    placement = placements.start()
    # Free memory as placement will see it (MiB): big 128 (zone a), twin 112 (zone a),
    # mid 96 (b), pre 64 (c: 96 with 32 used), full 12 (d: 32 with 20 used, below the
    # 16 MiB minimum), pres 128 (e, but its host is under memory pressure).
    servers = {
        "big": ("128MiB", "a", []),
        "twin": ("112MiB", "a", []),
        "mid": ("96MiB", "b", []),
        "pre": ("96MiB", "c", []),
        "full": ("32MiB", "d", []),
        "pres": ("128MiB", "e", ["--host-reserve", HUGE_RESERVE]),
    }
    started = {
        name: start_pageserver(name=name, capacity=capacity, extra=ps_args(placement, zone, *extra))
        for name, (capacity, zone, extra) in servers.items()
    }
    wait_registered(placement, set(servers))
    fill(started["pre"].ready["endpoint"], 32)
    fill(started["full"].ready["endpoint"], 20)
    wait_until("placement sampled the filled servers", lambda: used_mib(placement, "pre") >= 32)
    wait_until("placement sampled 'full'", lambda: used_mib(placement, "full") >= 20)
    states = {s.server_id: s.state for s in status_of(placement).servers}
    assert states["pres"] == "pressure" and states["big"] == "live"

    with BlockingPlacementClient(placement.ready["endpoint"]) as client:
        # k=3: one per zone, the most free of each: big (a), mid (b), pre (c). Not twin:
        # it has more free memory than mid and pre, but shares zone a with big.
        first = client.allocate("t", 1, 0, replicas=3)
        assert sorted(r.server_id for r in first.replicas) == ["big", "mid", "pre"]
        assert not first.degraded
        endpoints = {r.server_id: r.endpoint for r in first.replicas}
        assert endpoints["big"] == started["big"].ready["endpoint"]
        # Idempotent: the same request again is the same answer, epoch included.
        assert client.allocate("t", 1, 0, replicas=3).model_dump(
            exclude={"parent_id", "sent_at"}
        ) == (first.model_dump(exclude={"parent_id", "sent_at"}))
        # k=4 with only three eligible zones: zone a gets its second server only now.
        second = client.allocate("t", 1, 1, replicas=4)
        assert sorted(r.server_id for r in second.replicas) == ["big", "mid", "pre", "twin"]
        # k=5: only four servers are eligible (never 'full', never 'pres'): degraded.
        third = client.allocate("t", 1, 2, replicas=5)
        assert sorted(r.server_id for r in third.replicas) == ["big", "mid", "pre", "twin"]
        assert third.degraded and third.epoch > second.epoch > first.epoch
        slab_map = client.get_map("t", 1)
        assert slab_map.changed and slab_map.degraded == [2]
        assert [row[0] for row in slab_map.slabs] == [0, 1, 2]
        assert client.get_map("t", 1, since_epoch=slab_map.epoch).changed is False
        # With every eligible server draining, nothing is left: a clear refusal.
        for name in ("big", "twin", "mid", "pre"):
            client.drain(name)
        with pytest.raises(PlacementRequestError) as refused:
            client.allocate("t", 1, 3, replicas=1)
    assert refused.value.code == ErrorCode.NO_SPACE
    detail = refused.value.detail
    assert "full: full (12 MiB free, needs 16)" in detail
    assert "pres: under memory pressure" in detail and "big: draining" in detail
    metrics = scrape(placement)
    assert metrics['placement_pageservers{state="pressure"}'] == 1
    assert metrics['placement_slabs{state="degraded"}'] == 1
    assert metrics['placement_requests_total{op="allocate",result="error"}'] == 1
    assert metrics["placement_allocation_duration_seconds_count"] == 5
    assert metrics['placement_allocation_duration_seconds_bucket{le="0.001"}'] >= 4


def test_a_burst_before_the_next_scrape_spreads_out(
    placements: PlacementProcesses, start_pageserver: StartPageServer
) -> None:
    # One scrape when the servers register, then none for a minute: the whole burst is
    # placed on metrics that do not move. Without counting its own allocations placement
    # would put all twelve slabs on the emptiest server.
    placement = placements.start(
        ["--min-free", "16MiB", "--alloc-reserve", "16MiB", "--scrape-interval", "60",
         "--restart-grace", "0.5"]
    )  # fmt: skip
    free = {"a": 128, "b": 96, "c": 64}
    for name, mib in free.items():
        start_pageserver(name=name, capacity=f"{mib}MiB", extra=ps_args(placement, name))
    wait_registered(placement, set(free))
    chosen = []
    with BlockingPlacementClient(placement.ready["endpoint"]) as client:
        for slab in range(12):
            chosen.append(client.allocate("t", 2, slab, replicas=1).replicas[0].server_id)
    # Reference: each pick is the server with most free memory after 16 MiB for every slab
    # it already got in this burst (ties: fewer slabs, then name).
    expected = []
    count = dict.fromkeys(free, 0)
    for _ in range(12):
        pick = min(free, key=lambda s: (-(free[s] - 16 * count[s]), count[s], s))
        expected.append(pick)
        count[pick] += 1
    assert chosen == expected
    assert chosen[:2] == ["a", "a"] and set(chosen) == {"a", "b", "c"}
    assert (chosen.count("a"), chosen.count("b"), chosen.count("c")) == (6, 4, 2)


def test_map_changes_are_published_and_reports_probe_the_server(
    placements: PlacementProcesses,
    start_pageserver: StartPageServer,
    zmq_context: zmq.Context[zmq.Socket[bytes]],
) -> None:
    placement = placements.start([*FAST, "--publish", "tcp://127.0.0.1:0"])
    start_pageserver(name="ok1", capacity="64MiB", extra=ps_args(placement, "a"))
    wait_registered(placement, {"ok1"})
    sub = zmq_context.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(placement.ready["publish"])
    sub.setsockopt(zmq.SUBSCRIBE, map_topic("t", 3))
    try:
        with BlockingPlacementClient(placement.ready["endpoint"]) as client:
            slabs = iter(range(1000))

            def notice() -> tuple[int, MapChangedNotice] | None:
                # A SUB socket joins asynchronously: allocate until a notice comes through.
                reply = client.allocate("t", 3, next(slabs), replicas=1)
                client.allocate("t", 30, 0, replicas=1)  # another volume: not subscribed
                if not sub.poll(100):
                    return None
                topic, body = sub.recv_multipart()
                assert topic == map_topic("t", 3)
                return reply.epoch, MapChangedNotice.model_validate_json(body)

            epoch, seen = wait_until("a map-change notice", notice, timeout=10)
            assert (seen.tenant, seen.volume) == ("t", 3) and seen.epoch <= epoch
            assert client.get_map("t", 3, since_epoch=seen.epoch - 1).changed
    finally:
        sub.close(linger=0)
    with BlockingPlacementClient(placement.ready["endpoint"]) as client:
        reply = client.report_failure("t", 0, 0, "ok1", "timeout")
        assert reply.server_state == "suspect"
        # The probe (an inventory request to its data endpoint) is answered: live again.
        wait_until(
            "the probe to clear the suspicion",
            lambda: status_of(placement).servers[0].state == "live",
            timeout=5,
        )
        with pytest.raises(PlacementRequestError) as unknown:
            client.report_failure("t", 0, 0, "nobody")
    assert unknown.value.code == ErrorCode.NOT_FOUND
    assert placement.stop() == 0  # SIGTERM: a clean exit


def test_status_and_drain_tools(
    placements: PlacementProcesses, start_pageserver: StartPageServer
) -> None:
    placement = placements.start()
    start_pageserver(name="s1", capacity="64MiB", extra=ps_args(placement, "z1"))
    wait_registered(placement, {"s1"})

    def remem(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "remem_cli", *args, "--placement", placement.ready["endpoint"]],
            capture_output=True,
            text=True,
            timeout=60,
        )

    table = remem("status")
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()[:2]
    assert header.split()[:5] == ["SERVER", "ZONE", "STATE", "USED/CAPACITY", "SLABS"]
    assert row.split()[:3] == ["s1", "z1", "live"] and "64.0MiB" in row
    as_json = json.loads(remem("status", "--json").stdout)
    assert as_json["servers"][0]["server_id"] == "s1"
    assert as_json["degraded"] == [] and as_json["pushes"] == []
    drained = remem("drain", "s1")  # holds nothing: done at once
    assert drained.returncode == 0 and "s1 drained: safe to stop" in drained.stderr
    assert json.loads(remem("status", "--json").stdout)["servers"][0]["state"] == "draining"
    missing = remem("drain", "nope")
    assert missing.returncode == 1 and "not_found" in missing.stderr
    down = subprocess.run(
        [sys.executable, "-m", "remem_cli", "status", "--placement", "tcp://127.0.0.1:9",
         "--timeout", "0.3"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert down.returncode == 1 and "no reply" in down.stderr


def test_config_errors_exit_2_with_one_line() -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "remem_cli", "placement", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    for args, fragment in [
        (["--dead-after", "0.1"], "suspect_after < dead_after"),
        (["--utilization-source", "prometheus"], "needs --prometheus-url"),
        (["--listen", "http://x"], "--listen"),
        (["--min-free", "lots"], "--min-free"),
    ]:
        bad = run(*args, "--metrics-port", "0")
        assert bad.returncode == 2, bad.stderr
        assert bad.stderr.count("\n") == 1 and fragment in bad.stderr

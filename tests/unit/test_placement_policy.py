"""Placement policy on a fake clock: choosing servers, liveness, repairs, drains, restarts."""

from __future__ import annotations

import pytest
from remem_placement.policy import PLANNED_PER_SLOT, Cluster
from remem_placement.records import Drop, NoEligibleServer, PolicySettings, Push, Rebuilding

MiB = 1 << 20
SETTINGS = PolicySettings(
    suspect_after=0.75,
    dead_after=1.5,
    restart_grace=0.0,
    alloc_reserve=64 * MiB,
    min_free=64 * MiB,
    default_replicas=2,
    max_pushes=4,
    retry_after=1.0,
    stall_after=1e9,  # these tests jump the clock; see test_a_stall_of_placement_kills_nobody
    map_settle=0.0,  # pushes start at once; see test_a_push_waits_until_clients_see_its_target
)


def cluster_of(
    servers: list[tuple[str, str, int, int]], settings: PolicySettings = SETTINGS
) -> Cluster:
    """A cluster at t=0 with servers (id, zone, capacity MiB, used MiB) sampled from metrics."""
    cluster = Cluster(settings, started=0.0, epoch_start=1000)
    for server_id, zone, capacity, used in servers:
        cluster.register(
            server_id,
            endpoint=f"tcp://127.0.0.1:{7100 + len(cluster.servers)}",
            metrics_url="http://x/metrics",
            zone=zone,
            capacity_bytes=capacity * MiB,
            used_bytes=used * MiB,
            started_at=0.0,
            now=0.0,
            wall=100.0,
        )
        cluster.set_utilization(server_id, used * MiB, capacity * MiB, at=100.0)
    return cluster


def beat(cluster: Cluster, now: float, *, pressure: frozenset[str] = frozenset()) -> None:
    for server in cluster.servers.values():
        if server.liveness != "dead":
            cluster.heartbeat(
                server.server_id,
                used_bytes=server.used_bytes,
                capacity_bytes=server.capacity_bytes,
                under_pressure=server.server_id in pressure,
                now=now,
            )


FOUR = [("a1", "a", 1024, 0), ("b1", "b", 1024, 200), ("a2", "a", 1024, 100), ("c1", "c", 512, 0)]


def planned(cluster: Cluster, now: float, wall: float) -> tuple[list[Push], list[Drop]]:
    """`Cluster.plan`, every new push's target answering its clearing drop at once: the
    pushes that may start, and the other drops."""
    pushes, drops = cluster.plan(now, wall)
    clears = [drop for drop in drops if drop.push_id]
    for clear in clears:
        assert clear.server_id == cluster.pushes[clear.push_id].target
        assert cluster.cleared(clear.push_id, ok=True, now=now) == []
    if clears:
        pushes = pushes + cluster.plan(now, wall)[0]  # those nobody has to see the map of
    return pushes, [drop for drop in drops if not drop.push_id]


def test_most_free_first_and_one_per_zone() -> None:
    cluster = cluster_of(FOUR)
    # free: a1 1024, a2 924, b1 824, c1 512. k=3 wants three zones: a1 (a), b1 (b), c1 (c)
    # and not a2, although a2 has more free memory than b1 and c1: it shares a1's zone.
    got = cluster.allocate(("t", 0, 0), 3, now=0.1, wall=101.0)
    assert got.replicas == ["a1", "b1", "c1"] and not got.degraded
    # With more replicas than zones, a zone gets a second server only then.
    got = cluster.allocate(("t", 0, 1), 4, now=0.1, wall=101.0)
    assert sorted(got.replicas) == ["a1", "a2", "b1", "c1"]


def test_same_request_twice_same_answer_and_epoch_moves_only_on_change() -> None:
    cluster = cluster_of(FOUR)
    first = cluster.allocate(("t", 0, 5), 2, now=0.1, wall=101.0)
    again = cluster.allocate(("t", 0, 5), 2, now=0.2, wall=102.0)
    assert again == first
    assert cluster.volume_epoch[("t", 0)] == first.epoch > 1000


def test_reservations_spread_a_burst_until_the_next_sample() -> None:
    cluster = cluster_of([("a", "a", 1024, 0), ("b", "b", 1024, 256), ("c", "c", 1024, 512)])
    chosen = [cluster.allocate(("t", 0, n), 1, now=0.1, wall=101.0).replicas[0] for n in range(15)]
    # Each slab reserves 64 MiB: a (1024 free) takes 4 slabs until it looks like b (768),
    # then a and b alternate down to c's 512 (12 slabs in all), then all three take turns.
    assert chosen[:4] == ["a", "a", "a", "a"]
    assert chosen.index("c") == 12
    assert (chosen.count("a"), chosen.count("b"), chosen.count("c")) == (9, 5, 1)
    # A sample taken after the burst replaces the reservations by what the server reports.
    cluster.set_utilization("a", 0, 1024 * MiB, at=102.0)
    assert cluster.servers["a"].reservations == []
    assert cluster.allocate(("t", 0, 99), 1, now=0.2, wall=103.0).replicas == ["a"]


def test_never_full_never_pressured_degraded_then_refused() -> None:
    cluster = cluster_of([("a", "a", 1024, 0), ("full", "b", 1024, 1000), ("p", "c", 1024, 0)])
    beat(cluster, 0.1, pressure=frozenset({"p"}))
    got = cluster.allocate(("t", 0, 0), 3, now=0.1, wall=101.0)
    assert got.replicas == ["a"] and got.degraded
    beat(cluster, 0.2, pressure=frozenset({"p", "a"}))
    with pytest.raises(NoEligibleServer) as refused:
        cluster.allocate(("t", 0, 1), 2, now=0.2, wall=101.0)
    assert "full (24 MiB free" in str(refused.value)
    assert "p: under memory pressure" in str(refused.value)


def test_death_degrades_and_repair_pushes_from_a_survivor() -> None:
    cluster = cluster_of(FOUR)
    cluster.allocate(("t", 0, 0), 2, now=0.0, wall=101.0)  # a1, b1
    epoch = cluster.epoch
    for now in (0.5, 1.0, 1.5):
        cluster.heartbeat(
            "a1", used_bytes=0, capacity_bytes=1024 * MiB, under_pressure=False, now=now
        )
        for sid in ("a2", "c1"):
            cluster.heartbeat(
                sid, used_bytes=0, capacity_bytes=1024 * MiB, under_pressure=False, now=now
            )
    cluster.tick(1.0)
    assert cluster.servers["b1"].liveness == "suspect"
    dead, _ = cluster.tick(1.6)
    assert dead == ["b1"]
    assert cluster.slabs[("t", 0, 0)].replicas == ["a1"]
    assert cluster.epoch > epoch
    pushes, _ = planned(cluster, 1.6, 102.0)
    (push,) = pushes
    # Replacement: not zone a (a1 is there), so c1, although a2 has more free memory.
    assert (push.source, push.target, push.reason) == ("a1", "c1", "repair")
    assert cluster.view(("t", 0, 0)).filling == ["c1"]
    assert planned(cluster, 1.7, 102.0) == ([], [])  # one push per slab at a time
    assert cluster.push_finished(push.push_id, ok=True, copied_bytes=4096, now=1.8) == []
    view = cluster.view(("t", 0, 0))
    assert view.replicas == ["a1", "c1"] and view.filling == [] and not view.degraded


def test_failed_push_drops_the_partial_copy_and_retries_later() -> None:
    cluster = cluster_of(FOUR)
    cluster.allocate(("t", 0, 0), 1, now=0.0, wall=101.0)
    cluster.slabs[("t", 0, 0)].target = 2
    (push,), _ = planned(cluster, 0.1, 101.0)
    drops = cluster.push_finished(push.push_id, ok=False, now=0.2)
    assert drops == [Drop(push.target, ("t", 0, 0))]
    assert cluster.view(("t", 0, 0)).filling == []
    assert planned(cluster, 0.5, 101.0) == ([], [])  # backing off
    assert len(planned(cluster, 1.3, 101.0)[0]) == 1


def test_drain_copies_from_the_drained_server_then_drops_it() -> None:
    cluster = cluster_of(FOUR)
    cluster.allocate(("t", 0, 0), 2, now=0.0, wall=101.0)  # a1, b1
    assert cluster.drain("b1") == 1
    assert "b1" not in cluster.choose(4)
    (push,), _ = planned(cluster, 0.1, 101.0)
    assert (push.source, push.target, push.reason) == ("b1", "c1", "drain")
    # Until the copy is complete, b1 stays a readable replica.
    assert cluster.view(("t", 0, 0)).replicas == ["a1", "b1"]
    drops = cluster.push_finished(push.push_id, ok=True, now=0.2)
    assert drops == [Drop("b1", ("t", 0, 0))]
    assert cluster.view(("t", 0, 0)).replicas == ["a1", "c1"]
    assert cluster.held_by("b1") == set()


def test_pressure_moves_slabs_off_and_stops_when_it_recovers() -> None:
    cluster = cluster_of(FOUR)
    cluster.allocate(("t", 0, 0), 2, now=0.0, wall=101.0)
    cluster.allocate(("t", 0, 1), 2, now=0.0, wall=101.0)
    beat(cluster, 0.1, pressure=frozenset({"a1"}))
    pushes, _ = planned(cluster, 0.1, 101.0)
    assert {p.reason for p in pushes} == {"pressure"} and all(p.target != "a1" for p in pushes)
    for push in pushes:
        cluster.push_finished(push.push_id, ok=True, now=0.2)
    assert cluster.held_by("a1") == set()
    beat(cluster, 0.3)
    assert "a1" in cluster.choose(4)


def test_report_failure_suspects_until_the_probe_answers_or_kills() -> None:
    cluster = cluster_of(FOUR)
    assert cluster.report_failure("a1", now=0.1) == "suspect"
    assert "a1" not in cluster.choose(4)
    beat(cluster, 0.2)
    assert cluster.servers["a1"].liveness == "suspect"  # heartbeats do not clear a report
    cluster.probe_answered("a1", now=0.3)
    assert cluster.servers["a1"].state == "live"
    cluster.report_failure("b1", now=0.4)
    beat(cluster, 1.0)
    beat(cluster, 1.8)
    dead, _ = cluster.tick(2.0)
    assert dead == ["b1"]


def test_restart_rebuilds_from_inventories_and_waits_for_the_grace_period() -> None:
    settings = PolicySettings(**{**SETTINGS.__dict__, "restart_grace": 3.0})
    cluster = cluster_of(FOUR, settings)
    with pytest.raises(Rebuilding):
        cluster.allocate(("t", 0, 9), 2, now=0.5, wall=101.0)
    cluster.adopt_inventory("c1", [("t", 0, 0), ("t", 0, 1)], now=0.5)
    cluster.adopt_inventory("a1", [("t", 0, 0)], now=0.6)
    assert planned(cluster, 1.0, 101.0) == ([], [])  # nothing looks degraded yet
    assert cluster.allocate(("t", 0, 0), 2, now=1.0, wall=101.0).replicas == ["a1", "c1"]
    # A client re-announces a slab nobody wrote to yet; placement adopts its replicas.
    got = cluster.allocate(("t", 0, 7), 2, known=["b1", "a2"], now=1.0, wall=101.0)
    assert got.replicas == ["a2", "b1"]
    beat(cluster, 3.1)
    pushes, _ = planned(cluster, 3.1, 104.0)
    assert [p.key for p in pushes] == [("t", 0, 1)]  # only the slab with one copy


def test_a_returning_dead_server_drops_its_stale_copies() -> None:
    cluster = cluster_of(FOUR)
    cluster.allocate(("t", 0, 0), 2, now=0.0, wall=101.0)
    cluster.servers["b1"].last_seen = -10.0
    cluster.tick(0.1)
    cluster.register(
        "b1",
        endpoint="tcp://127.0.0.1:7999",
        metrics_url="http://x/metrics",
        zone="b",
        capacity_bytes=1024 * MiB,
        used_bytes=0,
        started_at=5.0,
        now=0.2,
        wall=101.0,
    )
    assert cluster.adopt_inventory("b1", [("t", 0, 0)], now=0.2) == [Drop("b1", ("t", 0, 0))]
    assert cluster.view(("t", 0, 0)).replicas == ["a1"]


def test_a_stall_of_placement_kills_nobody() -> None:
    settings = PolicySettings(**{**SETTINGS.__dict__, "stall_after": 0.375})
    cluster = cluster_of(FOUR, settings)
    cluster.allocate(("t", 0, 0), 2, now=0.0, wall=101.0)
    for step in range(1, 5):
        beat(cluster, step * 0.25)
        assert cluster.tick(step * 0.25) == ([], [])
    # The loop did not run for 5 s (placement paused): nobody could be heard meanwhile.
    assert cluster.tick(6.0) == ([], [])
    assert all(s.liveness == "live" for s in cluster.servers.values())
    # Silence after placement runs again does count: c1 stops, the others go on.
    now = 6.0
    dead: list[str] = []
    while not dead:
        now += 0.1
        for sid in ("a1", "a2", "b1"):
            cluster.heartbeat(
                sid, used_bytes=0, capacity_bytes=1024 * MiB, under_pressure=False, now=now
            )
        dead, _ = cluster.tick(now)
    # c1 was last heard at 1.0, i.e. at 6.0 on placement's clock once the stall is removed.
    assert dead == ["c1"] and 7.5 < now < 7.7


def test_a_push_waits_until_clients_see_its_target() -> None:
    settings = PolicySettings(**{**SETTINGS.__dict__, "map_settle": 5.0})
    cluster = cluster_of(FOUR, settings)
    cluster.allocate(("t", 0, 0), 1, now=0.0, wall=101.0)
    cluster.slabs[("t", 0, 0)].target = 2
    assert planned(cluster, 0.1, 101.0) == ([], [])  # planned: the target is filling, not copied
    (push,) = cluster.pushes.values()
    assert cluster.view(("t", 0, 0)).filling == [push.target]
    cluster.map_applied("t", 1, push.epoch)  # another volume's client: no
    cluster.map_applied("t", 0, push.epoch - 1)  # a map from before the target: no
    assert planned(cluster, 0.2, 101.0) == ([], [])
    cluster.map_applied("t", 0, push.epoch)
    assert planned(cluster, 0.3, 101.0) == ([push], [])
    # Nobody polls another volume: its push starts after map_settle anyway.
    cluster.allocate(("u", 0, 0), 1, now=0.0, wall=101.0)
    cluster.slabs[("u", 0, 0)].target = 2
    assert planned(cluster, 1.0, 101.0) == ([], [])
    assert planned(cluster, 5.9, 101.0) == ([], [])
    assert [p.key for p in planned(cluster, 6.1, 101.0)[0]] == [("u", 0, 0)]


def test_pushes_past_the_copying_slots_are_prepared_and_take_a_slot_at_once() -> None:
    # While max_pushes copy, more are cleared and shown to clients: when a copy ends the
    # next one starts at once, not after another round of clients' map polls.
    settings = PolicySettings(**{**SETTINGS.__dict__, "max_pushes": 2, "map_settle": 5.0})
    cluster = cluster_of(FOUR, settings)
    slabs = 2 * PLANNED_PER_SLOT + 2
    for slab in range(slabs):
        cluster.allocate(("t", 0, slab), 1, now=0.0, wall=101.0)
        cluster.slabs[("t", 0, slab)].target = 2
    assert planned(cluster, 0.1, 101.0) == ([], [])  # every target waits for the clients
    assert len(cluster.pushes) == 2 * PLANNED_PER_SLOT  # two to copy, the others prepared
    cluster.map_applied("t", 0, cluster.epoch)
    first, _ = planned(cluster, 0.2, 101.0)
    assert len(first) == 2 and cluster.copying == {p.push_id for p in first}
    assert planned(cluster, 0.3, 101.0) == ([], [])  # both slots taken
    assert cluster.push_finished(first[0].push_id, ok=True, copied_bytes=4096, now=0.4) == []
    (second,), _ = planned(cluster, 0.4, 101.0)  # no new wait for the clients
    assert second not in first
    assert len(cluster.pushes) == 2 * PLANNED_PER_SLOT  # another prepared in first[0]'s place
    assert ("t", 0, 2 * PLANNED_PER_SLOT) in cluster.pushing
    # An abandoned push frees its slot as well.
    cluster.push_finished(first[1].push_id, ok=False, now=0.5)
    (third,), _ = planned(cluster, 0.5, 101.0)
    assert third not in (*first, second)


def test_copies_are_spread_over_the_servers_rather_than_piled_on_one() -> None:
    # Each page server copies from one thread: with two slots, p->q and q->p together
    # finish sooner than two pushes onto q.
    settings = PolicySettings(**{**SETTINGS.__dict__, "max_pushes": 2})
    cluster = cluster_of([("p", "a", 1024, 0), ("q", "b", 1024, 0), ("r", "c", 1024, 0)], settings)
    for slab in range(6):
        cluster.allocate(("t", 0, slab), 2, now=0.0, wall=101.0)
    assert [cluster.slabs[("t", 0, slab)].replicas for slab in (1, 4, 5)] == [
        ["p", "r"],
        ["p", "r"],
        ["q", "r"],
    ]
    cluster.set_utilization("r", 1000 * MiB, 1024 * MiB, at=200.0)  # full: no target
    for slab in (1, 4, 5):
        cluster.missed_write("r", ("t", 0, slab), now=0.1)
    started, _ = planned(cluster, 0.2, 101.0)  # oldest first would be slabs 1 and 4, both to q
    assert sorted((p.key[2], p.source, p.target) for p in started) == [
        (1, "p", "q"),
        (5, "q", "p"),
    ]
    cluster.push_finished(started[0].push_id, ok=True, copied_bytes=4096, now=0.3)
    (last,), _ = planned(cluster, 0.3, 101.0)
    assert last.key == ("t", 0, 4)


def test_a_replica_that_missed_a_write_leaves_the_slab_and_is_replaced() -> None:
    cluster = cluster_of(FOUR)
    key = ("t", 0, 0)
    cluster.allocate(key, 2, now=0.0, wall=101.0)  # a1, b1
    epoch = cluster.epoch
    assert cluster.missed_write("b1", key, now=0.1) == [Drop("b1", key)]
    assert cluster.slabs[key].replicas == ["a1"]
    assert key not in cluster.held_by("b1")
    assert cluster.epoch > epoch
    (push,), _ = planned(cluster, 0.2, 101.0)
    assert push.source == "a1"
    # The last replica stays, stale or not: it is all there is.
    assert cluster.missed_write("a1", key, now=0.3) == [Drop(push.target, key)]
    assert cluster.slabs[key].replicas == ["a1"]
    assert cluster.slabs[key].filling == []  # the push from it was abandoned
    assert cluster.missed_write("a1", ("t", 0, 9), now=0.4) == []  # unknown slab


def test_a_push_target_that_missed_a_write_is_abandoned() -> None:
    cluster = cluster_of(FOUR)
    key = ("t", 0, 0)
    cluster.allocate(key, 1, now=0.0, wall=101.0)
    cluster.slabs[key].target = 2
    (push,), _ = planned(cluster, 0.1, 101.0)
    assert cluster.missed_write(push.target, key, now=0.2) == [Drop(push.target, key)]
    assert cluster.view(key).filling == [] and cluster.pushes == {}


def test_a_push_target_clears_any_old_copy_before_it_is_listed_as_filling() -> None:
    # The push never overwrites a page its target has: a page left from an earlier copy of
    # the slab would be served stale once the target is a replica. So the target drops the
    # slab first, and clients write to it only after it answered.
    cluster = cluster_of(FOUR)
    key = ("t", 0, 0)
    cluster.allocate(key, 1, now=0.0, wall=101.0)
    cluster.slabs[key].target = 2
    epoch = cluster.epoch
    pushes, drops = cluster.plan(0.1, 101.0)
    assert pushes == []
    (clear,) = drops
    push = cluster.pushes[clear.push_id]
    assert clear == Drop(push.target, key, push.push_id)
    assert cluster.view(key).filling == [] and cluster.epoch == epoch
    assert cluster.plan(0.2, 101.0) == ([], [])  # one push per slab: still clearing
    assert cluster.cleared(push.push_id, ok=True, now=0.3) == []
    assert cluster.view(key).filling == [push.target] and cluster.epoch > epoch
    (started,), _ = cluster.plan(0.4, 101.0)  # map_settle 0: nobody has to see the map first
    assert started.push_id == push.push_id and started.epoch == cluster.epoch
    assert cluster.cleared(push.push_id, ok=True, now=0.5) == []  # a late duplicate: ignored

    # A target that cannot clear (an error, a timeout): the push is abandoned, retried later.
    other = ("t", 0, 1)
    cluster.allocate(other, 1, now=0.0, wall=101.0)
    cluster.slabs[other].target = 2
    _, (clear,) = cluster.plan(0.6, 101.0)
    target = clear.server_id
    assert cluster.cleared(clear.push_id, ok=False, now=0.7) == [Drop(target, other)]
    assert cluster.view(other).filling == [] and other not in cluster.held_by(target)
    assert other not in cluster.pushing
    assert cluster.plan(0.8, 101.0) == ([], [])  # backing off


def test_a_clearing_target_s_old_copy_is_never_adopted_as_a_replica() -> None:
    # Its inventory may list the slab it is about to drop (it restarted meanwhile): even
    # with the slab's only replica suspect, that old copy must not become a replica.
    cluster = cluster_of(FOUR)
    key = ("t", 0, 0)
    cluster.allocate(key, 1, now=0.0, wall=101.0)
    cluster.slabs[key].target = 2
    _, (clear,) = cluster.plan(0.1, 101.0)
    (source,) = cluster.slabs[key].replicas
    cluster.report_failure(source, now=0.2)
    assert cluster.adopt_inventory(clear.server_id, [key], now=0.3) == []
    assert cluster.slabs[key].replicas == [source]


def test_a_slow_clear_does_not_shorten_the_wait_for_clients() -> None:
    # map_settle counts from when the target is listed as filling, not from planning: a
    # clear answered late must not let the push start before clients could see the target.
    settings = PolicySettings(**{**SETTINGS.__dict__, "map_settle": 5.0})
    cluster = cluster_of(FOUR, settings)
    key = ("t", 0, 0)
    cluster.allocate(key, 1, now=0.0, wall=101.0)
    cluster.slabs[key].target = 2
    _, (clear,) = cluster.plan(0.1, 101.0)
    assert cluster.cleared(clear.push_id, ok=True, now=8.0) == []
    assert cluster.plan(8.1, 101.0) == ([], [])
    assert cluster.plan(12.9, 101.0) == ([], [])
    (push,), _ = cluster.plan(13.1, 101.0)
    assert push.push_id == clear.push_id

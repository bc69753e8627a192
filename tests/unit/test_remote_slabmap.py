"""The slab map and replica health: backoff, stale replicas, placement's answers."""

from __future__ import annotations

import pytest
from remem_client.links import ReplicaFailure
from remem_client.remote import slabmap
from remem_client.remote.linkpool import page_keys, run_keys
from remem_client.remote.pagemap import PageMap
from remem_client.remote.slabmap import Replica, SlabMap
from remem_client.remote.stats import RemoteStats
from remem_common.protocol.pages import SLAB_PAGES

from .remote_fakes import FakePlacement, FakePool, FakeServer

A, B, C = (Replica(sid, f"inproc://{sid}") for sid in ("a", "b", "c"))


def slab_map() -> tuple[SlabMap, FakePlacement, FakePool, PageMap]:
    pages = PageMap(2 * SLAB_PAGES)
    pool = FakePool({sid: FakeServer(sid) for sid in "abc"})
    placement = FakePlacement(["a", "b", "c"], 2)
    return SlabMap(pages, placement, pool, RemoteStats()), placement, pool, pages


async def test_placements_map_sets_replicas_and_push_targets_and_drops_servers() -> None:
    slabs, _, pool, pages = slab_map()
    slabs.set_replicas(0, [A, B], [C])
    assert set(pool.links) == {"a", "b", "c"}  # connected at once, not at the first request
    assert slabs.write_targets(0, [A, B]) == [A, B, C]
    assert slabs.readable(0, [A, B]) == [A, B]  # a push target is not read yet
    assert not pages.unknown[0]
    slabs.set_replicas(1, [B, C], adopted=True)  # from the map after a restart
    assert pages.unknown[1]
    slabs.keep_only_servers({"b", "c"})
    assert pool.get("a") is None and pool.get("b") is not None


async def test_a_failed_replica_backs_off_and_comes_back(monkeypatch: pytest.MonkeyPatch) -> None:
    slabs, placement, _, _ = slab_map()
    slabs.replica_failed(ReplicaFailure("a", "timeout", "no answer"), 0)
    assert slabs.live([A, B]) == [B]
    assert placement.reports == [("a", 0, "timeout", False)]
    monkeypatch.setattr(slabmap, "FAILURE_BACKOFF", 0.0)
    assert slabs.live([A, B]) == [A, B]


async def test_a_stale_replica_is_reported_again_until_placements_map_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    slabs, placement, _, _ = slab_map()
    slabs.set_replicas(0, [A, B])
    slabs.missed_write(0, "a")
    slabs.missed_write(0, "a")  # reported moments ago: not again
    assert placement.missed() == [("a", 0)]
    assert slabs.readable(0, [A, B]) == [B]
    assert slabs.readable(0, [A]) == [A]  # the last copy is read, stale or not
    monkeypatch.setattr(slabmap, "FAILURE_BACKOFF", 0.0)
    slabs.map_applied(3)  # no answer yet: report again
    assert placement.missed() == [("a", 0), ("a", 0)]
    slabs.stale_reported("a", 0, 5)
    slabs.map_applied(4)  # a map from before placement acted on it
    assert slabs.readable(0, [A, B]) == [B]
    slabs.map_applied(5)
    assert slabs.readable(0, [A, B]) == [A, B]
    slabs.missed_write(0, "b")
    slabs.set_replicas(0, [A, C])  # placement replaced it
    slabs.map_applied(6)
    assert slabs.readable(0, [A, B]) == [A, B]


def test_run_keys_are_the_key_arrays_bytes() -> None:
    for first, count in [(0, 1), (SLAB_PAGES + 7, 64), (SLAB_PAGES - 100, 65)]:
        expected = page_keys(first, count, SLAB_PAGES).tobytes()
        assert bytes(memoryview(run_keys(first, count)).cast("B")) == expected

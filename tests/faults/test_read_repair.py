"""Scenario 6: a page server's arena corrupted on purpose (bytes flipped in the /dev/shm file
under the running server) and a page deleted behind the client's back. The checksum catches
the corruption, the read is served from the other replica, and the client writes the good
copy back to the damaged replica (read repair): afterwards that server alone serves the
right bytes. Pages are sealed (AES-GCM) by the client, so "the right bytes" on a page server
are the good replica's ciphertext and seal, and through NBD the plaintext.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from remem_common.pageserver_client import PageServerClient
from remem_common.protocol.pages import PAGE_SIZE, make_keys
from remem_pageserver.store import HEADER, SLOT_DTYPE, SLOT_USED, SLOTS_OFFSET

from .cluster import (
    TENANT,
    VOLUME,
    FaultCluster,
    MiB,
    data_set,
    digest,
    read_back,
    wait_until,
    write_through,
)
from .conftest import MakeCluster

pytestmark = pytest.mark.faults


def corrupt_page(arena: Path, slab: int, page: int) -> None:
    """Flip bytes of one page in a running page server's arena file (shared memory: the
    server sees the change at once; its stored checksum stays the old one)."""
    with arena.open("r+b") as f:
        header = HEADER.unpack(f.read(HEADER.size))
        capacity, data_offset = header[3], header[5]
        f.seek(SLOTS_OFFSET)
        slots = np.frombuffer(f.read(capacity * SLOT_DTYPE.itemsize), dtype=SLOT_DTYPE)
        (hit,) = np.flatnonzero(
            (slots["state"] == SLOT_USED)
            & (slots["volume"] == VOLUME)
            & (slots["slab"] == slab)
            & (slots["page"] == page)
        )
        where = data_offset + int(hit) * PAGE_SIZE + 100
        original = os.pread(f.fileno(), 16, where)
        os.pwrite(f.fileno(), bytes(b ^ 0xFF for b in original), where)


def page_on(endpoint: str, slab: int, page: int) -> tuple[bool, bytes]:
    """(found, sealed page: ciphertext + seal) of one page, asked of one page server."""
    with PageServerClient(endpoint) as client:
        found, _crcs, data, seals = client.get_sealed(TENANT, VOLUME, make_keys([slab], [page]))
    return bool(found[0]), data[0].tobytes() + seals[0].tobytes()


def preferred_replica(cluster: FaultCluster, slab: int) -> tuple[str, str]:
    """(server id, endpoint) of the replica the client reads `slab` from first (slab n
    prefers its (n mod k)-th replica, in the map's order)."""
    return replica_of(cluster, slab, 0)


def replica_of(cluster: FaultCluster, slab: int, rank: int) -> tuple[str, str]:
    """(server id, endpoint) of the replica `rank` places after the preferred one."""
    slab_map = cluster.slab_map()
    (replicas,) = [r for s, r, _ in slab_map.slabs if s == slab]
    server_id = replicas[(slab + rank) % len(replicas)]
    return server_id, slab_map.servers[server_id]


def test_corrupt_and_missing_pages_are_repaired_from_the_other_replica(
    make_cluster: MakeCluster, tmp_path: Path
) -> None:
    cluster = make_cluster(pageservers=3)
    # 8 MiB in slab 0 and 8 MiB in slab 1.
    second_offset = 64 * MiB
    data = {0: data_set(8 * MiB, b"slab0"), 1: data_set(8 * MiB, b"slab1")}
    write_through(cluster.socket, 0, data[0])
    write_through(cluster.socket, second_offset, data[1])
    cluster.wait_fully_replicated(slabs=2)

    damage = {0: [3, 700, 2047], 1: [5, 1500]}  # slab -> pages flipped on its preferred replica
    missing = (0, 1000)  # a page deleted on slab 0's preferred replica
    victims = {slab: preferred_replica(cluster, slab) for slab in damage}
    healthy = {slab: replica_of(cluster, slab, 1) for slab in damage}
    # What each page should be on a page server: the healthy replica's sealed copy, which
    # does not contain the plaintext.
    good_copy = {
        (slab, page): page_on(healthy[slab][1], slab, page)
        for slab, pages in damage.items()
        for page in [*pages, *([missing[1]] if slab == missing[0] else [])]
    }
    for (slab, page), (found, sealed) in good_copy.items():
        assert found and sealed[:PAGE_SIZE] != data[slab][page * PAGE_SIZE : (page + 1) * PAGE_SIZE]
    for slab, pages in damage.items():
        for page in pages:
            corrupt_page(cluster.arena(victims[slab][0]), slab, page)
    with PageServerClient(victims[0][1]) as direct:
        assert direct.delete(TENANT, VOLUME, make_keys([missing[0]], [missing[1]])) == 1

    def expected(slab: int, page: int) -> bytes:
        return data[slab][page * PAGE_SIZE : (page + 1) * PAGE_SIZE]

    for slab, pages in damage.items():
        for page in pages:
            assert page_on(victims[slab][1], slab, page)[1] != good_copy[slab, page][1]

    # A 4 KiB read (the client's fast path) of one damaged page, then everything back in
    # 1 MiB reads: every byte right.
    page_offset = 700 * PAGE_SIZE
    assert read_back(cluster.socket, page_offset, PAGE_SIZE) == expected(0, 700)
    assert digest(read_back(cluster.socket, 0, 8 * MiB)) == digest(data[0])
    assert digest(read_back(cluster.socket, second_offset, 8 * MiB)) == digest(data[1])

    repaired = len(damage[0]) + len(damage[1]) + 1

    def all_repaired() -> bool:
        return cluster.client_metrics()['client_read_repairs_total{result="ok"}'] >= repaired

    wait_until("the read repairs to complete", all_repaired, timeout=15)
    # The damaged replicas alone now hold the right bytes again.
    for slab, pages in damage.items():
        for page in [*pages, *([missing[1]] if slab == missing[0] else [])]:
            found, held = page_on(victims[slab][1], slab, page)
            assert found and held == good_copy[slab, page][1], (victims[slab][0], slab, page)
    metrics = cluster.client_metrics()
    assert metrics['client_read_repairs_total{result="failed"}'] == 0
    assert cluster.nbd_errors() == 0

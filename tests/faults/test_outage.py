"""Scenario 3: every page server SIGKILLed (the mirror serves reads and takes the writes),
then restarted on their arenas; the client resyncs the outage's writes, and with the mirror
stopped every byte reads back from the page servers alone.
"""

from __future__ import annotations

import signal

import pytest

from .cluster import MiB, data_set, digest, read_back, wait_until, write_through
from .conftest import MakeCluster

pytestmark = pytest.mark.faults


def test_all_page_servers_killed_mirror_serves_then_resync_restores_them(
    make_cluster: MakeCluster,
) -> None:
    cluster = make_cluster(pageservers=3, with_mirror=True)
    # 24 MiB over slabs 0 and 1, all replicated and on the mirror's disk.
    before = data_set(16 * MiB, b"before")
    write_through(cluster.socket, 0, before)
    write_through(cluster.socket, 64 * MiB, before[: 8 * MiB])
    wait_until(
        "the mirror to confirm every page",
        lambda: cluster.client_metrics()["client_mirror_cache_bytes"] == 0,
        30,
    )
    cluster.wait_fully_replicated(slabs=2)

    for server in cluster.pageservers.values():
        server.kill(signal.SIGKILL)
    # Reads: the first read of each slab waits for the replica timeout, then the mirror.
    assert digest(read_back(cluster.socket, 0, 16 * MiB)) == digest(before)
    assert digest(read_back(cluster.socket, 64 * MiB, 8 * MiB)) == digest(before[: 8 * MiB])
    # Writes during the outage: acknowledged once on the mirror's disk. One overwrites part
    # of slab 0, one fills a slab never written before the outage... (slab 1, pages past
    # the first 8 MiB: its replicas are known, just dead).
    during = data_set(4 * MiB, b"during")
    write_through(cluster.socket, 2 * MiB, during)
    write_through(cluster.socket, 64 * MiB + 12 * MiB, during)
    metrics = cluster.client_metrics()
    assert metrics["client_unreplicated_pages"] == 2 * (4 * MiB) // 4096
    assert metrics['client_mode{mode="network_down"}'] == 1
    expected_slab0 = before[: 2 * MiB] + during + before[6 * MiB :]
    assert digest(read_back(cluster.socket, 0, 16 * MiB)) == digest(expected_slab0)

    # The page servers come back on their arenas (SIGKILL left them intact in /dev/shm).
    for name in cluster.specs:
        cluster.start_pageserver(name)
    cluster.wait_registered(set(cluster.specs))
    wait_until(
        "the resync of every mirror-only page",
        lambda: cluster.client_metrics()["client_unreplicated_pages"] == 0,
        90,
    )
    metrics = cluster.client_metrics()
    assert metrics['client_mode{mode="normal"}'] == 1
    assert metrics['client_mirror_pages_total{kind="resynced"}'] >= 2 * (4 * MiB) // 4096
    cluster.wait_fully_replicated(slabs=2)

    # Without the mirror, the page servers alone serve every byte.
    assert cluster.mirror is not None
    assert cluster.mirror.stop() == 0
    assert digest(read_back(cluster.socket, 0, 16 * MiB)) == digest(expected_slab0)
    expected_slab1 = before[: 8 * MiB] + bytes(4 * MiB) + during
    assert digest(read_back(cluster.socket, 64 * MiB, 16 * MiB)) == digest(expected_slab1)
    assert (
        cluster.client_metrics()['client_mirror_pages_total{kind="read"}']
        == metrics['client_mirror_pages_total{kind="read"}']
    )
    assert cluster.nbd_errors() == 0

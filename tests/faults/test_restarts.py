"""Scenario 5: the control plane and the local processes SIGKILLed and restarted under load:
placement (its map is soft state, rebuilt from the page servers), the mirror (the client
keeps writing to the replicas and reconnects to the new mirror), and the client itself (a
new NBD connection after the restart sees every acknowledged write).
"""

from __future__ import annotations

import errno
import hashlib
import signal
import threading

import pytest
from remem_client.nbd import wire

from ..integration.nbd_raw import RawNbd
from .cluster import (
    FIO_SPREAD,
    FIO_SPREAD_BYTES,
    SIZE,
    MiB,
    data_set,
    fio,
    read_back,
    start_fio,
    verified_bytes,
    wait_until,
    write_through,
)
from .conftest import MakeCluster

pytestmark = pytest.mark.faults


def test_placement_sigkilled_and_restarted_under_load(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(pageservers=3)
    # The slabs are placed by a first pass; the second pass rewrites them while placement
    # is killed and comes back (a new epoch, the same map from the servers' inventories).
    fio(cluster.uri, *FIO_SPREAD, "--do_verify=0")
    before = cluster.wait_fully_replicated(slabs=4)
    run = start_fio(cluster.uri, *FIO_SPREAD, "--randseed=11", "--do_verify=1")
    writes = cluster.client_metrics()['client_nbd_requests_total{cmd="write",result="ok"}']
    wait_until(
        "the rewrite to get going",
        lambda: (
            cluster.client_metrics()['client_nbd_requests_total{cmd="write",result="ok"}']
            > writes + 32
        ),
        30,
    )
    assert cluster.placement is not None
    cluster.placement.kill(signal.SIGKILL)
    cluster.start_placement()
    assert verified_bytes(run.wait()) == FIO_SPREAD_BYTES
    cluster.wait_registered(set(cluster.specs))
    after = cluster.wait_fully_replicated(slabs=4)
    assert after.epoch > before.epoch
    assert sorted(after.slabs) == sorted(before.slabs)  # nothing moved
    assert (
        verified_bytes(fio(cluster.uri, *FIO_SPREAD, "--randseed=11", "--verify_only=1"))
        == FIO_SPREAD_BYTES
    )
    assert cluster.nbd_errors() == 0


def test_mirror_sigkilled_and_restarted_under_load(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(pageservers=3, with_mirror=True)
    metrics = cluster.client_metrics()
    assert metrics["client_mirror_up"] == 1  # a new volume: complete (trimmed) at once
    rebuilds = metrics["client_mirror_rebuilds_total"]
    run = start_fio(cluster.uri, *FIO_SPREAD, "--do_verify=1")

    def mirrored() -> float:
        return cluster.client_metrics()["client_mirror_written_bytes_total"]

    wait_until("the mirror to write a few MiB", lambda: mirrored() > 4 << 20, 60)
    assert cluster.mirror is not None
    # Paused before it dies, with a write certainly in flight (fio may be verifying by now):
    # the mirror misses it, and the client, timing it out, knows.
    cluster.mirror.kill(signal.SIGSTOP)
    extra = data_set(MiB, b"extra")  # past fio's data set
    write_through(cluster.socket, SIZE - MiB, extra)
    wait_until(
        "the client to notice the lost mirror",
        lambda: cluster.client_metrics()["client_mirror_up"] == 0,
        30,
    )
    cluster.mirror.kill(signal.SIGKILL)
    cluster.start_mirror()
    assert verified_bytes(run.wait()) == FIO_SPREAD_BYTES
    # The link tries the new mirror process (RETRY_AFTER), and the resync task rebuilds it
    # from the replicas: then it may serve page-ins again.
    wait_until(
        "the mirror to be rebuilt",
        lambda: cluster.client_metrics()["client_mirror_up"] == 1,
        60,
    )
    metrics = cluster.client_metrics()
    assert metrics["client_mirror_rebuilds_total"] == rebuilds + 1
    assert metrics['client_mirror_pages_total{kind="rebuilt"}'] >= (FIO_SPREAD_BYTES + MiB) // 4096

    # Proof: with every page server gone, the mirror alone serves fio's data set and the
    # write it missed.
    for server in cluster.pageservers.values():
        server.kill(signal.SIGKILL)
    assert verified_bytes(fio(cluster.uri, *FIO_SPREAD, "--verify_only=1")) == FIO_SPREAD_BYTES
    assert read_back(cluster.socket, SIZE - MiB, MiB) == extra
    assert cluster.client_metrics()['client_mirror_pages_total{kind="read"}'] > 0
    assert cluster.nbd_errors() == 0


def block_content(index: int, block: int) -> bytes:
    return hashlib.sha256(index.to_bytes(8, "little")).digest() * (block // 32)


def test_client_sigkilled_and_restarted_keeps_every_acknowledged_write(
    make_cluster: MakeCluster,
) -> None:
    cluster = make_cluster(pageservers=3, with_mirror=True)
    block = 64 * 1024
    acknowledged: list[int] = []

    def writer() -> None:
        try:
            with RawNbd.unix(str(cluster.socket)) as nbd:
                nbd.connect()
                for index in range(SIZE // block):
                    nbd.write(index * block, block_content(index, block))  # acknowledged
                    acknowledged.append(index)
        except (OSError, EOFError):
            return  # the client died under us: what was acknowledged must survive

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    wait_until("200 acknowledged writes", lambda: len(acknowledged) >= 200, 60)
    assert cluster.client is not None
    cluster.client.kill(signal.SIGKILL)
    thread.join(timeout=30)
    done = list(acknowledged)
    assert 200 <= len(done) < SIZE // block

    cluster.start_client()
    # fio reconnects too: a verifying workload on the restarted client, past the data set.
    with RawNbd.unix(str(cluster.socket)) as nbd:
        nbd.connect()
        for index in done:
            assert nbd.read(index * block, block) == block_content(index, block), index
    report = fio(cluster.uri, "--name=after", "--rw=randwrite", "--bs=4k", "--iodepth=16",
                 f"--offset={SIZE - (16 << 20)}", "--size=16M", "--verify=crc32c",
                 "--do_verify=1", "--verify_fatal=1")  # fmt: skip
    assert verified_bytes(report) == 16 << 20
    assert cluster.nbd_errors() == 0


def test_a_restarted_client_never_reads_stale_pages_from_a_mirror_that_missed_writes(
    make_cluster: MakeCluster,
) -> None:
    cluster = make_cluster(pageservers=3, with_mirror=True)
    old, new = data_set(MiB, b"old"), data_set(MiB, b"new")
    write_through(cluster.socket, 0, old)
    wait_until(
        "the mirror to confirm every page",
        lambda: cluster.client_metrics()["client_mirror_cache_bytes"] == 0,
        30,
    )
    # The mirror misses `new` for sure: paused while it is written (the replicas acknowledge
    # it), then killed, so the write it had queued dies with it.
    assert cluster.mirror is not None
    cluster.mirror.kill(signal.SIGSTOP)
    write_through(cluster.socket, 0, new)
    wait_until(
        "the client to time the mirror out",
        lambda: cluster.client_metrics()["client_mirror_up"] == 0,
        30,
    )
    cluster.mirror.kill(signal.SIGKILL)
    cluster.start_mirror()
    # The client dies before it could rebuild the mirror; its restart attaches a mirror
    # whose session did not end cleanly.
    assert cluster.client is not None
    cluster.client.kill(signal.SIGKILL)
    assert cluster.mirror_metrics()["mirror_clean"] == 0
    cluster.start_client()
    for server in cluster.pageservers.values():
        server.kill(signal.SIGSTOP)  # network down: page-ins come from the mirror, if at all
    try:
        with RawNbd.unix(str(cluster.socket), timeout=60) as nbd:
            nbd.connect()
            nbd.request(wire.Cmd.READ, 1, 0, MiB)
            reply = nbd.reply()
            # An error is acceptable (nothing trustworthy answers); stale data is not. The
            # rebuild may have finished before the pause, and then the mirror serves `new`.
            assert reply.error in (0, errno.EIO)
            if reply.error == 0:
                assert reply.data == new, "stale pages served from the mirror"
    finally:
        for server in cluster.pageservers.values():
            server.kill(signal.SIGCONT)
    # Once the replicas answer, the restarted client rebuilds the mirror, and it serves `new`.
    wait_until(
        "the mirror to be rebuilt",
        lambda: cluster.client_metrics()["client_mirror_up"] == 1,
        60,
    )
    for server in cluster.pageservers.values():
        server.kill(signal.SIGKILL)
    assert read_back(cluster.socket, 0, MiB) == new


def test_a_cleanly_stopped_client_trusts_its_mirror_at_once(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(pageservers=3, with_mirror=True)
    data = data_set(2 * MiB, b"kept")
    write_through(cluster.socket, 0, data)
    assert cluster.client is not None
    assert cluster.client.stop() == 0  # SIGTERM: the client detaches from its mirror
    assert cluster.mirror is not None
    assert cluster.mirror_metrics()["mirror_clean"] == 1
    cluster.start_client()
    metrics = cluster.client_metrics()
    assert metrics["client_mirror_up"] == 1
    assert metrics['client_mirror_pages_total{kind="rebuilt"}'] == 0
    for server in cluster.pageservers.values():
        server.kill(signal.SIGKILL)
    assert read_back(cluster.socket, 0, 2 * MiB) == data  # the mirror alone


def test_a_restarted_client_with_every_replica_silent_reads_an_error_not_zeros(
    make_cluster: MakeCluster,
) -> None:
    # A restarted client does not know which pages were written: a page no replica holds
    # reads as zeros only if every replica said so. Silence is no such answer.
    cluster = make_cluster(pageservers=3)
    data = data_set(MiB, b"written")
    write_through(cluster.socket, 0, data)
    assert cluster.client is not None
    cluster.client.kill(signal.SIGKILL)
    cluster.start_client()
    assert read_back(cluster.socket, 0, MiB) == data
    for server in cluster.pageservers.values():
        server.kill(signal.SIGSTOP)
    try:
        with RawNbd.unix(str(cluster.socket), timeout=60) as nbd:
            nbd.connect()
            nbd.request(wire.Cmd.READ, 1, 0, MiB)
            assert nbd.reply().error == errno.EIO
    finally:
        for server in cluster.pageservers.values():
            server.kill(signal.SIGCONT)

    def reads_again() -> bool:
        # Replicas that failed are skipped for a few seconds (FAILURE_BACKOFF), unless
        # placement lists them alive again first: until then a read may still fail.
        try:
            return read_back(cluster.socket, 0, MiB) == data
        except AssertionError:
            return False

    wait_until("the replicas to serve the data again", reads_again, 30)

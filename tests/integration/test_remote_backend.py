"""The client's remote backend against real page server processes.

Placement is the one part replaced here: `FixedPlacement` hands out replicas round-robin so
these tests pin down the data path alone (replication, failover, read-modify-write, trim).
The placement service's own tests cover choosing servers.
"""

from __future__ import annotations

import asyncio
import errno
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import zmq
from remem_client.backend import BackendError
from remem_client.mirror_link import MirrorLink
from remem_client.readahead import read_ahead_of
from remem_client.remote.backend import RemoteBackend
from remem_client.remote.slabmap import Replica
from remem_client.sealing import open_page_sealer
from remem_common.protocol.pages import PAGE_SIZE, SLAB_BYTES, SLAB_PAGES
from remem_common.testing import ServiceProcess, start_service

from ..conftest import StartPageServer

SIZE = 4 * SLAB_BYTES  # 256 MiB: four slabs


class FixedPlacement:
    """Replicas for slab n: servers n, n+1, ... (mod the number of servers)."""

    def __init__(self, servers: list[ServiceProcess], replicas: int) -> None:
        self.servers = [Replica(s.ready["server_id"], s.ready["endpoint"]) for s in servers]
        self.replicas = replicas
        self.failures: list[tuple[str, int]] = []
        self.allocations = 0

    async def allocate(self, slab: int) -> list[Replica]:
        self.allocations += 1
        count = len(self.servers)
        return [self.servers[(slab + i) % count] for i in range(self.replicas)]

    def report_failure(
        self, server_id: str, slab: int, detail: str, *, missed_write: bool = False
    ) -> None:
        self.failures.append((server_id, slab))


def backend_over(
    placement: FixedPlacement,
    context: zmq.Context[zmq.Socket[bytes]],
    tmp_path: Path,
    mirror: MirrorLink | None = None,
) -> RemoteBackend:
    """The backend every test here uses: tenant t, volume 0, sealed pages, 1 s timeout."""
    return RemoteBackend(
        size=SIZE,
        tenant="t",
        volume=0,
        placement=placement,
        context=context,
        replica_timeout=1.0,
        sealer=open_page_sealer(tmp_path / "page.key", tenant="t", volume=0),
        mirror=mirror,
    )


@pytest.fixture
async def cluster(
    start_pageserver: StartPageServer,
    tmp_path: Path,
    zmq_context: zmq.Context[zmq.Socket[bytes]],
) -> AsyncIterator[tuple[RemoteBackend, FixedPlacement, list[ServiceProcess]]]:
    servers = [start_pageserver(name=f"ps{i}", capacity="256MiB") for i in range(3)]
    placement = FixedPlacement(servers, replicas=2)
    backend = backend_over(placement, zmq_context, tmp_path)
    yield backend, placement, servers
    await backend.close()  # closes every socket it made: zmq_context fails the test otherwise


def random_bytes(length: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, length, dtype=np.uint8).tobytes()


async def test_unwritten_pages_read_as_zeros_without_allocating(cluster) -> None:
    backend, placement, _ = cluster
    assert bytes(await backend.pread(12345, 100000)) == bytes(100000)
    assert placement.allocations == 0
    assert backend.metadata_bytes() <= 64 * 1024 * SIZE // 2**30


async def test_writes_reads_at_any_offset_across_slabs(cluster) -> None:
    backend, placement, _ = cluster
    model = bytearray(SIZE)
    rng = np.random.default_rng(4)
    requests = [
        (0, 4096),
        (SLAB_BYTES - 4096, 8192),
        (SIZE - 4096, 4096),
        (1, 1),
        (4095, 2),
        (SLAB_BYTES - 100, 300),
        (7 * 4096 + 17, 3 * 4096 + 5),
        (SIZE - 10, 10),
    ]
    requests += [
        (int(o), int(n))
        for o, n in zip(rng.integers(0, SIZE - 70000, 40), rng.integers(1, 70000, 40), strict=True)
    ]
    for index, (offset, length) in enumerate(requests):
        data = random_bytes(length, index)
        await backend.pwrite(offset, memoryview(data), False)
        model[offset : offset + length] = data
    for offset, length in requests:
        assert bytes(await backend.pread(offset, length)) == model[offset : offset + length]
    # Concurrent requests batch into shared messages and still land right.
    writes = [(i * 3 * PAGE_SIZE + 5, random_bytes(PAGE_SIZE, 100 + i)) for i in range(64)]
    await asyncio.gather(*(backend.pwrite(o, memoryview(d), False) for o, d in writes))
    for offset, data in writes:
        model[offset : offset + len(data)] = data
    reads = await asyncio.gather(*(backend.pread(o, len(d)) for o, d in writes))
    assert all(bytes(r) == model[o : o + len(d)] for r, (o, d) in zip(reads, writes, strict=True))
    assert placement.allocations == 4


async def test_a_dead_replica_is_failed_over(cluster) -> None:
    backend, placement, servers = cluster
    data = random_bytes(SIZE // 4, 9)
    for offset in range(0, SIZE, SIZE // 4):
        await backend.pwrite(offset, memoryview(data), False)
    servers[1].kill(signal.SIGKILL)
    for offset in range(0, SIZE, SIZE // 4):
        assert bytes(await backend.pread(offset, len(data))) == data
    assert {server for server, _ in placement.failures} == {servers[1].ready["server_id"]}
    # Writes go on to the surviving replica of each slab.
    newer = random_bytes(2 * SLAB_BYTES, 10)
    await backend.pwrite(SLAB_BYTES, memoryview(newer), True)
    assert bytes(await backend.pread(SLAB_BYTES, len(newer))) == newer
    assert backend.stats.failovers >= 1


async def test_trim_and_zero_free_pages(cluster) -> None:
    backend, _, _ = cluster
    data = random_bytes(64 * PAGE_SIZE, 3)
    await backend.pwrite(0, memoryview(data), False)
    assert backend.written_pages() == 64
    await backend.trim(PAGE_SIZE, 8 * PAGE_SIZE)
    await backend.zero(20 * PAGE_SIZE + 100, 10 * PAGE_SIZE, False)
    assert backend.written_pages() == 64 - 8 - 9
    got = bytes(await backend.pread(0, len(data)))
    expect = bytearray(data)
    expect[PAGE_SIZE : 9 * PAGE_SIZE] = bytes(8 * PAGE_SIZE)
    expect[20 * PAGE_SIZE + 100 : 30 * PAGE_SIZE + 100] = bytes(10 * PAGE_SIZE)
    assert got == bytes(expect)


async def test_no_replica_left_is_an_io_error(cluster) -> None:
    backend, _, servers = cluster
    await backend.pwrite(0, memoryview(random_bytes(PAGE_SIZE, 1)), False)
    for server in servers[:2]:  # slab 0 lives on servers 0 and 1
        server.kill(signal.SIGKILL)
    with pytest.raises(BackendError) as failed:
        await backend.pread(0, PAGE_SIZE)
    assert failed.value.errno == errno.EIO
    assert bytes(await backend.pread(SLAB_PAGES * PAGE_SIZE, 10)) == bytes(10)


async def test_concurrent_overlapping_writes_end_in_an_order_they_arrived_in(cluster) -> None:
    """A partial-page write reads its page back, patches it and writes it whole; a whole-page
    write or trim of that page in flight at the same time must not be undone by it (the
    bytes outside the patch would go back to what they were before either write)."""
    backend, _, _ = cluster
    page = 3 * PAGE_SIZE
    old, new = random_bytes(PAGE_SIZE, 1), random_bytes(PAGE_SIZE, 2)
    patch = random_bytes(100, 3)
    for round_number in range(20):
        await backend.pwrite(page, memoryview(old), False)
        partial = backend.pwrite(page + 1000, memoryview(patch), False)
        whole = backend.pwrite(page, memoryview(new), False)
        if round_number % 2:  # either arrives first
            await asyncio.gather(whole, partial)
            expected = new[:1000] + patch + new[1100:]
        else:
            await asyncio.gather(partial, whole)
            expected = new
        assert bytes(await backend.pread(page, PAGE_SIZE)) == expected, round_number
    # Two partial writes on neighbouring pages, then a whole write over both: the whole write
    # waits for each only while it is in flight, never for one that finished while it
    # waited for the other (whichever finishes first).
    for _ in range(20):
        writes = [
            backend.pwrite(page + 1000, memoryview(patch), False),
            backend.pwrite(page + PAGE_SIZE + 1000, memoryview(patch), False),
            backend.pwrite(page, memoryview(new + new), False),
        ]
        await asyncio.wait_for(asyncio.gather(*writes), timeout=30)
        assert bytes(await backend.pread(page, 2 * PAGE_SIZE)) == new + new
    # A trim racing a partial write: zeros, then the patch on zeros (trim arrived first).
    await backend.pwrite(page, memoryview(old), False)
    await asyncio.gather(
        backend.trim(page, PAGE_SIZE), backend.pwrite(page + 1000, memoryview(patch), False)
    )
    assert bytes(await backend.pread(page, PAGE_SIZE)) == bytes(1000) + patch + bytes(
        PAGE_SIZE - 1100
    )


def versioned(first: int, count: int, version: int) -> bytes:
    """Pages whose every 8-byte word is (page << 32 | version): a read tells both apart."""
    words = (np.arange(first, first + count, dtype=np.uint64) << np.uint64(32)) | np.uint64(version)
    return np.repeat(words, PAGE_SIZE // 8).tobytes()


def versions_of(data: bytes, first: int) -> np.ndarray:
    words = np.frombuffer(data, dtype=np.uint64).reshape(-1, PAGE_SIZE // 8)
    assert (words == words[:, :1]).all(), "a page mixes two writes"
    pages = words[:, 0] >> np.uint64(32)
    written = words[:, 0] != 0
    assert (pages[written] == np.arange(first, first + len(words))[written]).all()
    return (words[:, 0] & np.uint64(0xFFFFFFFF)).astype(np.int64)


async def test_sequential_reads_are_answered_from_pages_fetched_ahead(cluster) -> None:
    backend, placement, _ = cluster
    backend.read_ahead = read_ahead_of(1 << 20)  # 256 pages, fetched 64 at a time
    region = 1024  # pages
    await backend.pwrite(0, memoryview(versioned(0, region, 1)), False)
    for first in range(0, region, 8):  # what the kernel's swap-in clusters look like
        data = await backend.pread(first * PAGE_SIZE, 8 * PAGE_SIZE)
        assert (versions_of(bytes(data), first) == 1).all()
    ahead = backend.read_ahead
    assert ahead.hits >= region * 3 // 4, f"only {ahead.hits} of {region} pages were ahead"
    # Never past the written region: pages never written are nobody's to fetch (and a
    # replica lacking them is no failure).
    assert ahead.hits <= ahead.fetched <= region
    assert placement.failures == []
    # Random reads are not a stream: nothing more is fetched.
    fetched = ahead.fetched
    rng = np.random.default_rng(5)
    for first in rng.choice(np.arange(2000, 60000, 64), 40, replace=False):
        await backend.pread(int(first) * PAGE_SIZE, PAGE_SIZE)
    assert ahead.fetched == fetched


async def test_pages_fetched_ahead_never_hide_a_later_write_or_trim(cluster) -> None:
    backend, _, _ = cluster
    backend.read_ahead = read_ahead_of(1 << 20)
    region = 256
    await backend.pwrite(0, memoryview(versioned(0, region, 1)), False)
    for first in range(0, 64, 8):  # the ring now holds pages up to about 128
        await backend.pread(first * PAGE_SIZE, 8 * PAGE_SIZE)
    assert backend.read_ahead.pending(64, 8) is None and backend.read_ahead.lookup(64, 8)
    await backend.pwrite(66 * PAGE_SIZE, memoryview(versioned(66, 2, 2)), False)
    await backend.pwrite(70 * PAGE_SIZE + 100, memoryview(b"\0" * 50), False)  # partial page
    await backend.trim(80 * PAGE_SIZE, 4 * PAGE_SIZE)
    await backend.zero(90 * PAGE_SIZE, PAGE_SIZE, False)
    data = bytes(await backend.pread(64 * PAGE_SIZE, 32 * PAGE_SIZE))
    expected = bytearray(versioned(64, 32, 1))
    expected[2 * PAGE_SIZE : 4 * PAGE_SIZE] = versioned(66, 2, 2)
    expected[6 * PAGE_SIZE + 100 : 6 * PAGE_SIZE + 150] = bytes(50)
    expected[16 * PAGE_SIZE : 20 * PAGE_SIZE] = bytes(4 * PAGE_SIZE)
    expected[26 * PAGE_SIZE : 27 * PAGE_SIZE] = bytes(PAGE_SIZE)
    assert data == bytes(expected)


async def test_a_read_never_sees_older_data_than_a_write_acknowledged_before_it(cluster) -> None:
    """A writer rewrites a region over and over while readers stream through it: every page a
    read returns is at least as new as the last write of it acknowledged before the read
    began. A fetch ahead that raced a write and was kept would break this."""
    backend, _, _ = cluster
    backend.read_ahead = read_ahead_of(1 << 20)
    region = 512
    await backend.pwrite(0, memoryview(versioned(0, region, 1)), False)
    acked = np.ones(region, dtype=np.int64)
    done = asyncio.Event()
    rng = np.random.default_rng(9)

    async def writer() -> None:
        for version in range(2, 200):
            first = int(rng.integers(0, region // 4)) * 4
            count = int(rng.choice([1, 4, 8]))
            count = min(count, region - first)
            await backend.pwrite(
                first * PAGE_SIZE, memoryview(versioned(first, count, version)), False
            )
            acked[first : first + count] = version
            await asyncio.sleep(0)
        done.set()

    async def reader(start: int) -> int:
        checked = 0
        while not done.is_set():
            for first in range(start, region, 8):
                floor = acked[first : first + 8].copy()
                data = await backend.pread(first * PAGE_SIZE, 8 * PAGE_SIZE)
                seen = versions_of(bytes(data), first)
                assert (seen >= floor).all(), f"pages {first}..: read {seen} after {floor}"
                checked += 1
                # A read the ring answers does not suspend: without this, once every page
                # sits in the ring, a reader spins and the writer never runs again.
                await asyncio.sleep(0)
        return checked

    results = await asyncio.gather(writer(), reader(0), reader(256))
    assert min(results[1:]) > 0
    assert backend.read_ahead.hits > 0


@pytest.fixture
async def mirrored(
    start_pageserver: StartPageServer,
    tmp_path: Path,
    zmq_context: zmq.Context[zmq.Socket[bytes]],
) -> AsyncIterator[tuple[RemoteBackend, MirrorLink]]:
    """A backend over two page servers and a real `remem mirror` process (new: incomplete)."""
    servers = [start_pageserver(name=f"ps{i}", capacity="256MiB") for i in range(2)]
    mirror = start_service(
        "mirror",
        ["mirror", "--listen", "tcp://127.0.0.1:0", "--metrics-port", "0", "--insecure",
         "--path", str(tmp_path / "mirror.img"), "--size", str(SIZE)],
    )  # fmt: skip
    link = MirrorLink(
        mirror.ready["endpoint"], context=zmq_context, cache_bytes=4 << 20, timeout=10
    )
    backend = backend_over(FixedPlacement(servers, replicas=2), zmq_context, tmp_path, link)
    assert not (await link.attach()).complete
    yield backend, link
    await backend.close()  # closes every socket it made: zmq_context fails the test otherwise
    assert mirror.stop() == 0


async def test_a_mirror_rebuilt_under_racing_writes_ends_equal_to_the_replicas(mirrored) -> None:
    """Writers keep rewriting pages while the rebuild copies the device to the mirror: a run
    read from the replicas before a write landed must not reach the mirror after that
    write's own copy. At the end the mirror holds exactly what the replicas hold."""
    backend, link = mirrored
    region = 3 * 256  # three rebuild runs of slab 0, and a run of slab 1 below
    await backend.pwrite(0, memoryview(versioned(0, region, 1)), False)
    await backend.pwrite(SLAB_BYTES, memoryview(versioned(SLAB_PAGES, 256, 1)), False)
    assert link.incomplete
    rng = np.random.default_rng(3)
    rebuilt = asyncio.Event()

    async def writer() -> int:
        # Aimed at the run the rebuild is copying (where a race can leave a stale page),
        # with pauses so that its reads also get through.
        writes = 0
        version = 2
        while not rebuilt.is_set() and writes < 400:  # then the rebuild finishes alone
            run = backend._rebuilding
            low, high = (0, region) if run is None or run[0] >= region else run[:2]
            first = int(rng.integers(low, min(high, region) - 2))
            count = int(rng.choice([1, 2]))
            await backend.pwrite(
                first * PAGE_SIZE, memoryview(versioned(first, count, version)), False
            )
            version += 1
            writes += 1
            await asyncio.sleep(0.002)
        return writes

    async def rebuild() -> None:
        while not await backend.rebuild_mirror():
            await asyncio.sleep(0)  # gave up a round (a run kept changing): go on
        rebuilt.set()

    _, *writes = await asyncio.gather(rebuild(), writer(), writer())
    assert min(writes) > 0
    assert not link.incomplete
    assert backend.stats.pages_rebuilt >= region + 256
    await link.barrier()  # the mirror applied every write sent so far
    for first, count in [(0, region), (SLAB_PAGES, 256)]:
        expected = bytes(await backend.pread(first * PAGE_SIZE, count * PAGE_SIZE))
        on_mirror = (await link.read(first, count)).tobytes()
        stale = np.flatnonzero(versions_of(on_mirror, first) != versions_of(expected, first))
        assert not stale.size, f"mirror pages {stale[:8] + first} differ from the replicas"
    assert (await link.read(2 * SLAB_PAGES, 256)).tobytes() == bytes(256 * PAGE_SIZE)


async def test_a_rebuild_clears_mirror_only_marks_the_client_does_not_hold(mirrored) -> None:
    """A mark_replicated the mirror lost (it died with it queued) leaves a page marked
    mirror-only there; a restarted client would adopt the mark and serve the mirror's copy,
    stale by then. The rebuild clears every mark the client does not hold, and keeps the
    client's own mirror-only pages as they are."""
    backend, link = mirrored
    await backend.pwrite(0, memoryview(versioned(0, 64, 1)), False)
    # The mirror marks pages 8..15 mirror-only (a durable write the client then resynced,
    # whose mark_replicated was lost) and 40..47 too (still mirror-only for the client).
    await link.write_durable(8, np.frombuffer(versioned(8, 8, 1), np.uint8).reshape(8, -1))
    mine = np.frombuffer(versioned(40, 8, 7), np.uint8).reshape(8, -1)
    await link.write_durable(40, mine)
    backend.mark_unreplicated(bytes([0, 0, 0, 0, 0, 0xFF]))  # pages 40..47
    assert await backend.rebuild_mirror()
    _, bitmap = await link.list_unreplicated()
    marked = np.flatnonzero(np.unpackbits(np.frombuffer(bitmap, np.uint8), bitorder="little"))
    assert marked.tolist() == list(range(40, 48))
    assert (await link.read(40, 8, mirror_only=True)).tobytes() == mine.tobytes()
    assert (await link.read(0, 8)).tobytes() == versioned(0, 8, 1)


async def test_an_incomplete_mirror_serves_only_its_mirror_only_pages(mirrored) -> None:
    """A mirror that may have missed writes serves the pages it alone holds (written durably
    while the network was down, adopted at a restart); the rest of a read comes from the
    replicas, and a page only on the mirror is never looked for on them."""
    backend, link = mirrored
    await backend.pwrite(0, memoryview(versioned(0, 64, 1)), False)
    durable = np.frombuffer(versioned(8, 8, 5), np.uint8).reshape(8, -1)
    await link.write_durable(8, durable)  # newer than the replicas' version 1
    only_here = np.frombuffer(versioned(100, 8, 5), np.uint8).reshape(8, -1)
    await link.write_durable(100, only_here)  # never on a replica
    bitmap = bytearray(16)
    bitmap[1] = bitmap[12] = 0xFF  # pages 8..15 and 96..103
    backend.mark_unreplicated(bytes(bitmap))
    assert link.incomplete
    data = bytes(await backend.pread(0, 64 * PAGE_SIZE))
    assert versions_of(data, 0).tolist() == [1] * 8 + [5] * 8 + [1] * 48
    data = bytes(await backend.pread(96 * PAGE_SIZE, 8 * PAGE_SIZE))
    assert data[: 4 * PAGE_SIZE] == bytes(4 * PAGE_SIZE)  # marked, never written anywhere
    assert data[4 * PAGE_SIZE :] == only_here[:4].tobytes()
    assert backend.stats.replica_failures == 0

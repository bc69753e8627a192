"""The remote backend's reads over fake page servers: failover, staleness, repair, read-ahead.

Slab 0 lives on ps0 and ps1 (FakePlacement), and ps0 is its preferred reader (slab 0 mod 2),
so a test decides what each copy holds and which fails.
"""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import pytest
from remem_client.backend import BackendError
from remem_client.readahead import read_ahead_of
from remem_client.remote import slabmap
from remem_client.sealing import open_page_sealer
from remem_common.protocol.pages import PAGE_SIZE

from .remote_fakes import FakeServer, page_of, rig, turns_until


async def test_pages_never_written_read_as_zeros_without_a_request() -> None:
    async with rig() as r:
        assert await r.read(5, 40) == [0] * 40
        assert all(not server.requests for server in r.servers.values())
        assert r.backend.stats.pages_read_zero == 40


async def test_a_read_fails_over_and_a_replica_that_missed_a_write_is_not_read_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with rig() as r:
        await r.write(0, 8, 1)
        ps0, ps1 = r.server(0), r.server(1)
        ps0.down = True
        assert await r.read(0, 8) == [1] * 8  # from ps1
        assert r.backend.stats.failovers >= 1
        assert ("ps0", 0, "timeout", False) in r.placement.reports
        # ps0 backs off: the next write skips it, so its copy is stale from now on.
        await r.write(2, 1, 2)
        assert r.placement.missed() == [("ps0", 0)]
        assert ps0.ops("put") == 1 and ps1.ops("put") == 2
        # Back and past its backoff, ps0 is still not read for slab 0: it missed a write.
        ps0.down = False
        monkeypatch.setattr(slabmap, "FAILURE_BACKOFF", 0.0)
        gets = ps0.ops("get")
        assert await r.read(0, 8) == [1, 1, 2, 1, 1, 1, 1, 1]
        assert ps0.ops("get") == gets
        # Placement answered the report (epoch 7) and its map at 7 keeps ps0 (refilled):
        # ps0 is read again.
        r.backend.slabs.stale_reported("ps0", 0, 7)
        r.backend.slabs.map_applied(7)
        await r.read(0, 8)
        assert ps0.ops("get") == gets + 1


async def test_no_copy_left_is_an_io_error() -> None:
    async with rig() as r:
        await r.write(0, 1, 1)
        r.server(0).down = r.server(1).down = True
        with pytest.raises(BackendError) as failed:
            await r.read(0, 1)
        assert failed.value.errno == errno.EIO


async def test_a_corrupt_page_is_read_from_the_next_replica_and_written_back() -> None:
    async with rig() as r:
        await r.write(0, 4, 1)
        ps0, ps1 = r.server(0), r.server(1)
        ps0.corrupt((0, 1))
        assert await r.read(0, 4) == [1] * 4
        assert ("ps0", 0, "missing or corrupt pages", False) in r.placement.reports
        await turns_until(lambda: r.backend.stats.read_repairs == 1)
        assert ps0.pages[(0, 1)] == ps1.pages[(0, 1)]
        assert ps0.pages[(0, 1)][0][:PAGE_SIZE] == page_of(1, 1)


async def test_a_page_lost_by_a_replica_is_written_back_too() -> None:
    async with rig() as r:
        await r.write(0, 4, 1)
        del r.server(0).pages[(0, 2)]
        assert await r.read(0, 4) == [1] * 4
        await turns_until(lambda: r.backend.stats.read_repairs == 1)
        assert (0, 2) in r.server(0).pages


async def test_read_repair_is_skipped_when_a_write_to_the_slab_overlapped_the_read() -> None:
    """The good copy may be older than a write that landed meanwhile: not written back."""
    async with rig() as r:
        await r.write(0, 4, 1)
        ps0, ps1 = r.server(0), r.server(1)
        ps0.corrupt((0, 1))
        ps1.held = True
        read = asyncio.ensure_future(r.read(0, 4))
        await turns_until(lambda: ps1.holding() == 1)  # ps0 served it corrupt; ps1 asked
        write = asyncio.ensure_future(r.write(100, 1, 2))  # same slab, another page
        await turns_until(lambda: ps1.holding() == 2)
        ps1.release()
        assert await read == [1] * 4
        await write
        assert r.backend.stats.read_repairs_skipped == 1 and r.backend.stats.read_repairs == 0
        assert ps0.pages[(0, 1)] != ps1.pages[(0, 1)]  # the next read tries again
        assert await r.read(0, 4) == [1] * 4
        await turns_until(lambda: r.backend.stats.read_repairs == 1)


async def test_a_page_altered_under_a_valid_checksum_fails_authentication(
    tmp_path: Path,
) -> None:
    sealer = open_page_sealer(tmp_path / "page.key", tenant="t", volume=0)
    async with rig(sealer=sealer) as r:
        await r.write(0, 4, 1)
        ps0: FakeServer = r.server(0)
        assert ps0.pages[(0, 0)][0] != page_of(0, 1)  # the servers hold ciphertext
        ps0.tamper((0, 3))
        assert await r.read(0, 4) == [1] * 4
        assert r.backend.stats.auth_failures == 1
        await turns_until(lambda: r.backend.stats.read_repairs == 1)
        assert ps0.pages[(0, 3)] == r.server(1).pages[(0, 3)]


async def test_an_adopted_slab_reads_pages_no_replica_holds_as_zeros_only_if_all_answer() -> None:
    async with rig() as r:
        replicas = await r.placement.allocate(0)
        r.backend.slabs.set_replicas(0, replicas, adopted=True)  # a restarted client
        assert await r.read(0, 4) == [0] * 4
        # Replicas lacking pages of an adopted slab are not reported: those pages were most
        # likely never written, and a restarted client reads such pages at every start.
        assert r.placement.reports == []
        # But a replica lacking a page another replica holds lost it: that is reported.
        await r.write(5, 1, 1)
        r.backend.slabs.set_replicas(0, replicas, adopted=True)  # restarted again
        first = next(r.holders(0))
        del first.pages[(0, 5)]
        assert await r.read(5, 1) == [1]
        assert [(sid, slab) for sid, slab, *_ in r.placement.reports] == [(first.server_id, 0)]
        r.server(1).down = True
        with pytest.raises(BackendError):
            await r.read(0, 4)  # ps1 might hold them: no proof they were never written


async def test_sequential_reads_are_served_from_pages_fetched_ahead() -> None:
    async with rig() as r:
        r.backend.read_ahead = ahead = read_ahead_of(1 << 20)  # 256 pages, 64 a fetch
        assert ahead is not None
        await r.write(0, 256, 1)
        for first in range(0, 64, 8):
            assert await r.read(first, 8) == [1] * 8
        assert ahead.hits >= 40 and ahead.fetched <= 256
        # A write drops its pages from the ring: the next read sees it.
        await r.write(70, 2, 2)
        assert await r.read(64, 8) == [1] * 6 + [2] * 2
        # Never past what was written: pages no one wrote are nobody's to fetch.
        for first in range(64, 256, 8):
            await r.read(first, 8)
        assert ahead.fetched <= 256
        assert all(not missed for *_, missed in r.placement.reports)

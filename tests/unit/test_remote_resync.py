"""Mirror fallback, resync and mirror rebuild over fake page servers and a fake mirror.

Each test decides when the replicas answer: what goes to the mirror alone, what the resync
copies back (and what waits for it), and what a rebuild of the mirror may send. A replica
that failed is left alone for FAILURE_BACKOFF seconds; the tests end that wait at once
where the replicas come back (`back`).
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from remem_client.remote import slabmap
from remem_common.protocol.pages import PAGE_SIZE, SLAB_PAGES

from .remote_fakes import FakeMirror, Rig, page_of, pages_of, rig, turns_until


def back(r: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every page server answers again, and the client tries them at once."""
    for server in r.servers.values():
        server.down = False
    monkeypatch.setattr(slabmap, "FAILURE_BACKOFF", 0.0)


async def test_with_no_replica_answering_writes_go_to_the_mirror_alone_until_resynced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mirror = FakeMirror()
    async with rig(mirror=mirror) as r:
        backend = r.backend
        for server in r.servers.values():
            server.down = True
        await r.write(0, 4, 1)
        assert backend.mode == "network_down" and backend.unreplicated_pages == 4
        assert mirror.unreplicated == {0, 1, 2, 3}
        assert await r.read(0, 4) == [1] * 4  # from the mirror
        assert backend.stats.pages_read_mirror == 4
        # Still down: the resync stops at its first run and says so.
        assert await backend.resync_once() == 0
        assert backend.stats.resync_failures == 1 and backend.mode == "network_down"
        back(r, monkeypatch)
        assert await backend.resync_once() == 4
        assert backend.mode == "normal" and backend.unreplicated_pages == 0
        assert not mirror.unreplicated
        mirror.down = True  # the replicas serve it now
        assert await r.read(0, 4) == [1] * 4
        assert r.server(0).pages[(0, 2)][0] == page_of(2, 1)


async def test_a_write_that_reaches_the_replicas_ends_a_pages_mirror_only_state(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mirror = FakeMirror()
    async with rig(mirror=mirror) as r:
        for server in r.servers.values():
            server.down = True
        await r.write(10, 2, 1)
        back(r, monkeypatch)
        await r.write(10, 1, 2)
        assert r.backend.unreplicated_pages == 1 and mirror.unreplicated == {11}
        assert await r.backend.resync_once() == 1
        assert await r.read(10, 2) == [2, 1]


async def test_a_write_to_a_slab_being_resynced_waits_for_it_and_lands_last(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The resync copies the mirror's older page: a write sent in between would be undone."""
    mirror = FakeMirror()
    async with rig(mirror=mirror) as r:
        ps0, ps1 = r.server(0), r.server(1)
        ps0.down = ps1.down = True
        await r.write(0, 4, 1)
        back(r, monkeypatch)
        puts = ps1.ops("put")
        ps0.held = True
        resync = asyncio.ensure_future(r.backend.resync_once())
        await turns_until(lambda: ps0.holding() == 1)
        write = asyncio.ensure_future(r.write(1, 1, 2))
        for _ in range(20):
            await asyncio.sleep(0)
        assert ps1.ops("put") == puts + 1  # the resync's only: the write waits
        ps0.release()
        assert await resync == 4
        await write
        assert await r.read(0, 4) == [1, 2, 1, 1]
        assert ps0.pages[(0, 1)][0] == ps1.pages[(0, 1)][0] == page_of(1, 2)


async def test_a_rebuild_copies_the_replicas_and_keeps_the_mirrors_own_pages() -> None:
    mirror = FakeMirror(complete=False)  # may have missed writes: serves only its own pages
    async with rig(mirror=mirror) as r:
        backend = r.backend
        await r.write(0, 8, 1)
        await r.write(20, 4, 1)
        mirror.pages.clear()  # what it missed
        mine = np.frombuffer(pages_of(20, 4, 9), np.uint8).reshape(4, PAGE_SIZE)
        await mirror.write_durable(20, mine)
        bitmap = bytearray(SLAB_PAGES // 8)
        bitmap[2] = 0xF0  # pages 20..23: mirror-only (newer there than on the replicas)
        backend.mark_unreplicated(bytes(bitmap))
        assert await r.read(16, 8) == [0] * 4 + [9] * 4  # only its own pages from the mirror
        mirror.pages[SLAB_PAGES + 5] = page_of(SLAB_PAGES + 5, 3)  # stale: slab 1 is empty
        assert await backend.rebuild_mirror()
        assert not mirror.incomplete and backend.stats.mirror_rebuilds == 1
        assert [mirror.pages.get(p) for p in range(8)] == [page_of(p, 1) for p in range(8)]
        assert [mirror.pages[p] for p in range(20, 24)] == [page_of(p, 9) for p in range(20, 24)]
        assert SLAB_PAGES + 5 not in mirror.pages  # trimmed
        assert mirror.unreplicated == {20, 21, 22, 23}


async def test_a_rebuild_run_changed_while_it_was_read_is_read_again() -> None:
    """A run read from the replicas before a write landed must not reach the mirror after
    that write's own copy."""
    mirror = FakeMirror(complete=False)
    async with rig(mirror=mirror) as r:
        backend = r.backend
        await r.write(0, 8, 1)
        mirror.pages.clear()
        ps0 = r.server(0)
        ps0.held = True
        rebuild = asyncio.ensure_future(backend.rebuild_mirror())
        await turns_until(lambda: ps0.holding() == 1)  # reading the first run
        assert backend._rebuilding is not None and backend._rebuilding[0] == 0
        write = asyncio.ensure_future(r.write(2, 1, 2))
        await turns_until(lambda: ps0.holding() == 2)
        ps0.release()  # the old copy, then the write
        assert await rebuild
        await write
        assert mirror.pages[2] == page_of(2, 2)
        assert ps0.ops("get") >= 2  # the run was read again
        assert backend._rebuilding is None

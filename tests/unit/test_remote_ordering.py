"""Write ordering: which change waits for which, on its own and through the backend.

A partial-page write reads its page, patches it and writes it whole; a whole-page write of
that page in flight at the same time must not be undone by it. The fake servers answer
only when released, so each test sees what was sent before an earlier change finished.
"""

from __future__ import annotations

import asyncio

from remem_client.remote.ordering import WriteOrdering
from remem_common.protocol.pages import PAGE_SIZE

from .remote_fakes import page_of, rig, turns_until

PATCH = b"\xab" * 100


def patched(page: bytes) -> bytes:
    return page[:1000] + PATCH + page[1100:]


async def test_a_whole_page_write_waits_for_an_earlier_partial_write_of_the_page() -> None:
    async with rig() as r:
        await r.write(3, 1, 1)
        ps0, ps1 = r.server(0), r.server(1)
        ps0.held = ps1.held = True
        partial = asyncio.ensure_future(
            r.backend.pwrite(3 * PAGE_SIZE + 1000, memoryview(PATCH), False)
        )
        await turns_until(lambda: ps0.holding() == 1)  # reading page 3 back
        whole = asyncio.ensure_future(r.write(3, 1, 2))
        for _ in range(20):
            await asyncio.sleep(0)
        assert ps0.ops("put") == ps1.ops("put") == 1  # only the first write's
        ps0.release()
        ps1.release()
        await asyncio.gather(partial, whole)
        assert bytes(await r.backend.pread(3 * PAGE_SIZE, PAGE_SIZE)) == page_of(3, 2)


async def test_a_partial_write_waits_for_an_earlier_whole_page_write() -> None:
    async with rig() as r:
        await r.write(3, 1, 1)
        ps0, ps1 = r.server(0), r.server(1)
        ps0.held = ps1.held = True
        whole = asyncio.ensure_future(r.write(3, 1, 2))
        await turns_until(lambda: ps0.holding() == 1)
        partial = asyncio.ensure_future(
            r.backend.pwrite(3 * PAGE_SIZE + 1000, memoryview(PATCH), False)
        )
        for _ in range(20):
            await asyncio.sleep(0)
        assert ps0.ops("get") == ps1.ops("get") == 0  # it did not read the old page
        ps0.release()
        ps1.release()
        await asyncio.gather(whole, partial)
        expected = patched(page_of(3, 2))
        assert bytes(await r.backend.pread(3 * PAGE_SIZE, PAGE_SIZE)) == expected


async def test_whole_page_writes_with_no_partial_write_in_flight_do_not_wait() -> None:
    async with rig() as r:
        ps0 = r.server(0)
        ps0.held = True
        writes = [asyncio.ensure_future(r.write(3, 1, v)) for v in (1, 2)]
        await turns_until(lambda: ps0.holding() == 2)  # both sent in the same turns
        ps0.release()
        await asyncio.gather(*writes)
        assert await r.read(3, 1) == [2]


async def test_a_trim_racing_a_partial_write_lands_in_arrival_order() -> None:
    async with rig() as r:
        await r.write(3, 1, 1)
        await asyncio.gather(
            r.backend.trim(3 * PAGE_SIZE, PAGE_SIZE),
            r.backend.pwrite(3 * PAGE_SIZE + 1000, memoryview(PATCH), False),
        )
        assert bytes(await r.backend.pread(3 * PAGE_SIZE, PAGE_SIZE)) == patched(bytes(PAGE_SIZE))


async def test_waits_point_only_at_earlier_overlapping_changes() -> None:
    ordering = WriteOrdering(slab_count=1)
    partial = ordering.write(3, 4, (3, 4))
    async with partial:  # nothing earlier: enters at once
        unrelated = ordering.write(10, 20)
        async with unrelated:  # covers no edge of the partial write
            pass
        covering = ordering.write(0, 8)
        task = asyncio.ensure_future(covering.__aenter__())
        for _ in range(5):
            await asyncio.sleep(0)
        assert not task.done() and ordering.busy(0, 4) is partial
    await task  # the partial write left: the covering write runs
    await covering.__aexit__(None, None, None)
    assert ordering.busy(0, 100) is None and ordering.partial_writes == 0


async def test_a_write_cancelled_while_waiting_leaves_the_register() -> None:
    ordering = WriteOrdering(slab_count=1)
    partial = ordering.write(3, 3, (3,))
    await partial.__aenter__()
    waiting = ordering.write(3, 3)
    task = asyncio.ensure_future(waiting.__aenter__())
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await partial.__aexit__(None, None, None)
    assert ordering.busy(0, 100) is None


async def test_a_watch_sees_changes_that_start_in_its_run_and_slab_marks_count_writes() -> None:
    ordering = WriteOrdering(slab_count=2)
    run = ordering.watch(100, 200)
    ordering.write(200, 300)  # just past the run
    assert not run.changed
    ordering.write(150, 150)
    assert run.changed
    ordering.unwatch()
    assert ordering.slab_write_mark(1) == 0
    ordering.slab_write_began(1)
    assert ordering.slab_write_mark(1) is None  # in flight: no repair may trust a read
    ordering.slab_write_ended(1)
    assert ordering.slab_write_mark(1) == 1 and ordering.slab_write_mark(0) == 0

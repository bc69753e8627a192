"""Read-ahead for sequential page-ins: pages fetched before the kernel asks for them.

The kernel pages a swapped-out region back in address order, a few pages per request (its
own swap read-ahead, `vm.page-cluster`), and each request waits for a round trip to a page
server: that wait, not bandwidth, is what a page-in costs. When reads come in sequence, the
client fetches the window of pages that follows them in one batch, ahead of the kernel, and
keeps those pages in a fixed ring; a read found whole in the ring is answered with no round
trip, and a read of pages whose fetch is still on its way waits for that fetch instead of
asking again. (Leap, ATC '20, makes the same case for remote-memory paging.)

The ring holds pages as the replicas do, sealed: a fetch is a guess, so it neither decrypts
(a read that finds the pages opens them, and a page fetched for nothing costs no AES) nor
fails over or reports anything; a page that does not come back found and checksummed is not
kept, and a read that misses or fails to open a page takes the client's usual path.

Consistency: the ring holds each page as it was when fetched. A write, trim or zeroing of a
page drops it from the ring when it starts and again when it completes, and marks the fetches
in flight that cover it stale, so their pages are never kept: a fetch that read a replica
while a write was landing cannot leave the old bytes behind.

Memory: the ring is allocated once, at start, and never grows.

Two parts: `ReadAhead`, the ring and its streams (no I/O), and `ReadAheadFilter`, which sits
in front of a backend's reads the way nbdkit's readahead filter sits in front of a plugin,
and reaches the backend only through a narrow `SealedPages` source: fetch pages sealed,
open them, and say which are written.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from remem_common.protocol.pages import PAGE_SIZE, SEAL_BYTES, PageArray

# A read this close (in pages) past the end of a stream's last read continues it: the
# kernel's read-ahead requests of one fault can arrive a little out of order.
STREAM_SLACK = 8
# Streams followed at once. Swap-in interleaves long runs with single-page reads elsewhere
# (measured: 97% of the pages in runs of 64 pages or more, broken by about one read in ten);
# one stray read must not make a run start over and fetch again what the ring holds.
MAX_STREAMS = 8
# The first window of a stream, in pages (windows then double up to the ring's window).
MIN_WINDOW = 16


@dataclass(slots=True)
class Fetch:
    """Pages [first, end) being fetched ahead."""

    first: int
    end: int
    done: asyncio.Future[None]
    stale: bool = False


class ReadAhead:
    """A ring of `capacity` pages fetched ahead, in windows of up to `window` pages."""

    def __init__(self, capacity: int, window: int) -> None:
        if capacity < 1 or not 1 <= window <= capacity:
            raise ValueError("read-ahead needs 1 <= window <= capacity pages")
        self.capacity = capacity
        self.window = window
        self.hits = 0  # pages answered from the ring (after waiting for their fetch or not)
        self.waited = 0  # of those, pages whose read waited for the fetch still on its way
        self.fetched = 0  # pages fetched ahead and kept
        self._data: PageArray = np.zeros((capacity, PAGE_SIZE), dtype=np.uint8)
        self._seals: PageArray = np.zeros((capacity, SEAL_BYTES), dtype=np.uint8)
        self._page_of = [-1] * capacity
        self._slot_of: dict[int, int] = {}
        self._next_slot = 0
        self._fetches: list[Fetch] = []
        # [end of the stream's last read, end of what was fetched for it (pages,
        # exclusive), pages read in it], the most recently read stream first.
        self._streams: list[list[int]] = []

    # -- reads -----------------------------------------------------------------------------

    def lookup(self, first: int, count: int) -> tuple[bytes, bytes] | None:
        """Pages [first, first + count) and their seals, if the ring holds every one."""
        slot = self._slot_of.get(first)
        if slot is None:
            return None
        slots = [slot]
        for page in range(first + 1, first + count):
            slot = self._slot_of.get(page)
            if slot is None:
                return None
            slots.append(slot)
        self.hits += count
        if slots[-1] - slots[0] == count - 1:  # filled together: one slice
            lo, hi = slots[0], slots[0] + count
            return self._data[lo:hi].tobytes(), self._seals[lo:hi].tobytes()
        return (
            b"".join(self._data[slot] for slot in slots),
            b"".join(self._seals[slot] for slot in slots),
        )

    def pending(self, first: int, count: int) -> asyncio.Future[None] | None:
        """The fetch in flight that covers pages [first, first + count), if any."""
        end = first + count
        for fetch in self._fetches:
            if fetch.first <= first and end <= fetch.end and not fetch.stale:
                return fetch.done
        return None

    def next_window(
        self, first: int, count: int, page_count: int, boundary: int
    ) -> tuple[int, int] | None:
        """After a read of [first, first + count): the pages to fetch ahead now, or None
        (not a sequential stream, or a whole window is fetched, or being fetched, ahead).
        A window never crosses a multiple of `boundary` (a slab: one replica set, one key).

        Keeping one to two windows ahead keeps a second fetch on its way while the reader
        consumes the first: with one, a reader faster than a fetch waits for each window."""
        end = first + count
        # A stream whose last read ended within STREAM_SLACK pages before `first`, or
        # inside this read: as count >= 1, one range of ends.
        lowest = first - STREAM_SLACK
        for index, stream in enumerate(self._streams):
            if lowest <= stream[0] <= end:
                del self._streams[index]
                break
        else:  # a new stream, or a stray read
            self._streams.insert(0, [end, -1, count])
            del self._streams[MAX_STREAMS:]
            return None
        stream[0] = max(end, stream[0])
        stream[2] += count
        self._streams.insert(0, stream)
        # Windows grow with the stream (twice what it read so far): most streams of a few
        # pages end there, and a full window fetched for each would mostly go unread.
        window = min(self.window, max(MIN_WINDOW, 2 * stream[2]))
        if stream[1] - end >= window:
            return None
        start = max(end, stream[1])
        while start in self._slot_of:  # held already (a fetch for a stream that broke off)
            start += 1
        stop = min(start + window, page_count, (start // boundary + 1) * boundary)
        if start >= stop:
            return None
        stream[1] = stop
        return start, stop

    # -- fetches ---------------------------------------------------------------------------

    def begin(self, first: int, end: int) -> Fetch:
        fetch = Fetch(first, end, asyncio.get_running_loop().create_future())
        self._fetches.append(fetch)
        return fetch

    def finish(self, fetch: Fetch, pages: Any = None, seals: Any = None) -> None:
        """Keep a fetch's pages and seals ((count, 4096) and (count, 28) arrays; None if it
        failed) unless stale."""
        self._fetches.remove(fetch)
        if pages is not None and not fetch.stale:
            count = min(fetch.end - fetch.first, self.capacity)
            self._drop(fetch.first, fetch.first + count)
            if self._next_slot + count > self.capacity:
                self._next_slot = 0  # keep a window's slots together: one slice per hit
            start = self._next_slot
            for offset in range(count):
                old = self._page_of[start + offset]
                if old >= 0:
                    del self._slot_of[old]
                self._page_of[start + offset] = fetch.first + offset
                self._slot_of[fetch.first + offset] = start + offset
            self._data[start : start + count] = pages[:count]
            self._seals[start : start + count] = seals[:count]
            self._next_slot = start + count
            self.fetched += count
        if not fetch.done.done():
            fetch.done.set_result(None)

    # -- writes ----------------------------------------------------------------------------

    def forget(self, first: int, end: int) -> None:
        """Pages [first, end) change: drop them, and mark fetches covering them stale."""
        for fetch in self._fetches:
            if fetch.first < end and first < fetch.end:
                fetch.stale = True
        if self._slot_of:
            self._drop(first, end)

    def _drop(self, first: int, end: int) -> None:
        if end - first <= len(self._slot_of):
            pages: Any = range(first, end)
        else:  # a large trim: look at what the ring holds instead
            pages = [page for page in self._slot_of if first <= page < end]
        for page in pages:
            slot = self._slot_of.pop(page, None)
            if slot is not None:
                self._page_of[slot] = -1


# Pages fetched per window at most: 512 KiB, several of the kernel's page-in clusters, and
# little wasted where a sequential run ends.
MAX_WINDOW = 128


def read_ahead_of(nbytes: int) -> ReadAhead | None:
    """A ring of `nbytes` (None for 0: read-ahead off), fetching a quarter of it at most at
    a time, up to MAX_WINDOW pages."""
    capacity = nbytes // PAGE_SIZE
    if capacity < 1:
        return None
    return ReadAhead(capacity=capacity, window=min(MAX_WINDOW, max(1, capacity // 4)))


class SealedPages(Protocol):
    """What read-ahead needs of the backend beneath it (the remote backend's replica reads)."""

    def written_prefix(self, first: int, count: int) -> int:
        """How many pages from `first` on (of at most `count`) are known written."""
        ...

    async def fetch_sealed(self, first: int, count: int) -> tuple[Any, Any]:
        """Pages [first, first + count) of one slab as stored, sealed, with their seals
        ((count, 4096) and (count, 28) arrays), or (None, None): a guess, so nothing fails
        over or is reported."""
        ...

    def open_sealed(self, first: int, count: int, data: Any, seals: Any) -> memoryview | None:
        """The plaintext of pages of one slab, or None if one fails authentication."""
        ...


class ReadAheadFilter:
    """Read-ahead in front of a backend's reads, over a `SealedPages` source.

    A read asks `lookup` (and, on a miss, waits for a `pending` fetch and looks again),
    then tells `follow`, which fetches the next window of a sequential stream; every change
    runs inside `changing`. With `ring` None (read-ahead off) `lookup` must not be called
    and the rest does nothing."""

    def __init__(
        self, source: SealedPages, *, page_count: int, boundary: int, ring: ReadAhead | None
    ) -> None:
        self.ring = ring
        self._source = source
        self._page_count = page_count
        self._boundary = boundary  # a window never crosses a multiple of it (a slab)
        self._fetching: set[asyncio.Task[None]] = set()

    def lookup(self, first: int, count: int, *, waited: bool = False) -> memoryview | None:
        """Plaintext of pages [first, first + count) if the ring holds them all, else None
        (the read takes the usual path); `waited`: the read waited for their fetch.

        A hit that spans two slabs is left to the usual path; one that fails
        authentication too, and the ring drops its pages."""
        ring = self.ring
        assert ring is not None
        hit = ring.lookup(first, count)
        if hit is None:
            return None
        if waited:
            ring.waited += count
        if (first + count - 1) // self._boundary != first // self._boundary:
            return None
        plain = self._source.open_sealed(first, count, *hit)
        if plain is None:
            ring.forget(first, first + count)
        return plain

    def may_serve(self, first: int, count: int) -> bool:
        """Whether `lookup` or `pending` could find pages [first, first + count): the ring
        holds its first page, or a fetch in flight covers it. False: both would find
        nothing (and change nothing)."""
        ring = self.ring
        return ring is not None and (
            first in ring._slot_of
            or (bool(ring._fetches) and ring.pending(first, count) is not None)
        )

    def pending(self, first: int, count: int) -> asyncio.Future[None] | None:
        """The fetch in flight that covers pages [first, first + count), if any: wait for it
        with `asyncio.wait`, not `await` (cancelling the reader must not cancel it)."""
        return None if self.ring is None else self.ring.pending(first, count)

    def follow(self, first: int, count: int) -> None:
        """After a read of [first, first + count): fetch the next window if reads stream."""
        ring = self.ring
        if ring is None or count > ring.window:
            return  # reads larger than a window (1 MiB ones) never find theirs whole in it
        window = ring.next_window(first, count, self._page_count, self._boundary)
        if window is None:
            return
        # Only pages known written: the rest read as zeros without asking anyone, and on a
        # slab adopted after a restart a replica lacking a page that was never written is
        # no failure worth reporting for a guess.
        start = window[0]
        written = self._source.written_prefix(start, window[1] - start)
        if written:
            fetch = ring.begin(start, start + written)
            task = asyncio.ensure_future(self._fetch(ring, fetch))
            self._fetching.add(task)
            task.add_done_callback(self._fetching.discard)

    async def _fetch(self, ring: ReadAhead, fetch: Fetch) -> None:
        pages = seals = None
        try:
            pages, seals = await self._source.fetch_sealed(fetch.first, fetch.end - fetch.first)
        finally:
            ring.finish(fetch, pages, seals)

    async def changing(self, offset: int, length: int, change: Awaitable[None]) -> None:
        """Run a write, trim or zeroing of bytes [offset, offset + length), its pages
        dropped from the ring before and after: a fetch that read the replicas while the
        change was landing is not kept."""
        self._forget(offset, length)
        try:
            await change
        finally:
            self._forget(offset, length)

    def _forget(self, offset: int, length: int) -> None:
        if self.ring is not None:
            self.ring.forget(offset // PAGE_SIZE, -(-(offset + length) // PAGE_SIZE))

    def close(self) -> None:
        """Cancel the fetches in flight (guesses: nobody waits for them but readers)."""
        for task in list(self._fetching):
            task.cancel()

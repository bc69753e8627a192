"""The client's read-ahead ring on its own: streams, windows, and what a write drops."""

from __future__ import annotations

import numpy as np
import pytest
from remem_client.readahead import ReadAhead, read_ahead_of
from remem_common.protocol.pages import PAGE_SIZE, SEAL_BYTES

SLAB = 1 << 20  # no slab boundary in these tests but the one below


def pages(first: int, count: int) -> np.ndarray:
    out = np.zeros((count, PAGE_SIZE), dtype=np.uint8)
    out[:, 0] = np.arange(first, first + count) % 251
    return out


def seals(first: int, count: int) -> np.ndarray:
    out = np.zeros((count, SEAL_BYTES), dtype=np.uint8)
    out[:, 0] = np.arange(first, first + count) % 241
    return out


def fill(ahead: ReadAhead, first: int, count: int) -> None:
    ahead.finish(ahead.begin(first, first + count), pages(first, count), seals(first, count))


def held(first: int, count: int) -> tuple[bytes, bytes]:
    return pages(first, count).tobytes(), seals(first, count).tobytes()


async def test_a_stream_gets_windows_ahead_and_a_jump_ends_it() -> None:
    ahead = ReadAhead(capacity=64, window=16)
    assert ahead.next_window(100, 4, 1000, SLAB) is None  # one read is no stream yet
    assert ahead.next_window(104, 4, 1000, SLAB) == (108, 124)
    assert ahead.next_window(108, 4, 1000, SLAB) == (124, 140)  # a second window on its way
    assert ahead.next_window(112, 4, 1000, SLAB) is None  # a whole window ahead still
    assert ahead.next_window(124, 4, 1000, SLAB) == (140, 156)  # topped up
    assert ahead.next_window(500, 4, 1000, SLAB) is None  # a jump: a new stream begins
    assert ahead.next_window(504, 4, 1000, SLAB) == (508, 524)
    assert ahead.next_window(900, 1, 1000, SLAB) is None  # a stray read...
    assert ahead.next_window(128, 4, 1000, SLAB) is None  # ...and the first stream goes on, a
    assert ahead.next_window(132, 4, 1000, SLAB) is None  # whole window still ahead of it
    assert ahead.next_window(144, 4, 1000, SLAB) == (156, 172)
    assert ahead.next_window(990, 4, 1000, SLAB) is None
    assert ahead.next_window(994, 4, 1000, SLAB) == (998, 1000)  # never past the device
    assert ahead.next_window(998, 2, 1000, SLAB) is None


async def test_fetched_pages_are_served_until_dropped_or_evicted() -> None:
    ahead = ReadAhead(capacity=32, window=16)
    fetch = ahead.begin(10, 26)
    assert ahead.pending(12, 4) is fetch.done and ahead.lookup(12, 4) is None
    ahead.finish(fetch, pages(10, 16), seals(10, 16))
    assert fetch.done.done() and ahead.pending(12, 4) is None
    assert ahead.lookup(12, 4) == held(12, 4)
    assert ahead.lookup(24, 4) is None  # 26, 27 were never fetched
    ahead.forget(13, 14)
    assert ahead.lookup(12, 4) is None and ahead.lookup(14, 4) == held(14, 4)
    for first in (100, 200):  # 32 more pages push the first fetch out of the ring
        fill(ahead, first, 16)
    assert ahead.lookup(14, 1) is None
    assert ahead.lookup(100, 16) == held(100, 16)
    assert ahead.lookup(200, 16) == held(200, 16)
    assert ahead.hits == 4 + 4 + 32 and ahead.fetched == 48


async def test_a_fetch_overlapping_a_write_is_not_kept() -> None:
    ahead = ReadAhead(capacity=32, window=16)
    fetch = ahead.begin(0, 16)
    ahead.forget(15, 20)  # a write began (or ended) while the fetch was on its way
    ahead.finish(fetch, pages(0, 16), seals(0, 16))
    assert fetch.done.done()
    assert ahead.lookup(0, 1) is None and ahead.fetched == 0
    failed = ahead.begin(0, 16)
    ahead.finish(failed, None)  # a fetch that failed wakes its waiters, keeps nothing
    assert failed.done.done() and ahead.lookup(0, 1) is None


def test_sizes() -> None:
    assert read_ahead_of(0) is None
    ring = read_ahead_of(8 << 20)
    assert ring is not None and (ring.capacity, ring.window) == (2048, 128)
    small = read_ahead_of(16 * PAGE_SIZE)
    assert small is not None and (small.capacity, small.window) == (16, 4)
    with pytest.raises(ValueError):
        ReadAhead(capacity=4, window=8)


async def test_a_window_skips_pages_the_ring_holds() -> None:
    ahead = ReadAhead(capacity=64, window=16)
    fill(ahead, 10, 20)
    assert ahead.next_window(2, 4, 1000, SLAB) is None
    assert ahead.next_window(6, 4, 1000, SLAB) == (30, 46)  # 10..29 are held already


async def test_windows_grow_with_the_stream() -> None:
    ahead = ReadAhead(capacity=1024, window=128)
    assert ahead.next_window(0, 1, 10000, SLAB) is None
    assert ahead.next_window(1, 1, 10000, SLAB) == (2, 18)  # a short stream: a short window
    assert ahead.next_window(1000, 8, 10000, SLAB) is None
    assert ahead.next_window(1008, 8, 10000, SLAB) == (1016, 1048)  # twice the 16 pages read
    assert ahead.next_window(1016, 8, 10000, SLAB) == (1048, 1096)  # 24 read: up to 48 ahead
    windows = [ahead.next_window(first, 8, 10000, SLAB) for first in range(1024, 2048, 8)]
    sizes = [stop - start for start, stop in filter(None, windows)]
    assert max(sizes) == 128 and sizes == sorted(sizes)


async def test_a_window_stops_at_a_slab_boundary() -> None:
    ahead = ReadAhead(capacity=64, window=16)
    assert ahead.next_window(90, 4, 1000, 100) is None
    assert ahead.next_window(94, 2, 1000, 100) == (96, 100)  # the rest is the next slab's
    assert ahead.next_window(96, 4, 1000, 100) == (100, 116)

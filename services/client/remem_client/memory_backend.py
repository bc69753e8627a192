"""In-memory backend: the whole device in one anonymous mapping (remem's `nbdkit memory`).

Used by tests, benchmarks and `remem client --backend memory`. Only data callbacks live
here; all protocol work is in `nbd/` (the split of nbdkit's plugins/memory vs server/).

Why an anonymous `mmap` and not a `bytearray`: a bytearray of N bytes is zero-filled at
creation, so a 1 GiB device would cost 1 GiB of RAM before the first write; an anonymous
mapping is zero pages until written. Reads return `bytes` copies (one memcpy, as nbdkit
does into its reply buffer): a memoryview into the mapping would alias, and a write that
lands after the read but before the reply leaves the socket buffer would change the data
the client gets. Writes copy the caller's buffer into the mapping, so the NBD layer may
reuse it at once. FUA and flush are no-ops: memory is as durable as this backend gets.

Every call completes without awaiting, so the backend is `eager` (see `backend.py`): the
NBD layer runs it straight from the socket callback, no Task per request.
"""

from __future__ import annotations

import logging
import mmap

log = logging.getLogger(__name__)

PAGE_SIZE = mmap.PAGESIZE
_ZERO_CHUNK = memoryview(bytes(1 << 20))


class MemoryBackend:
    """A RAM-backed device of `size` bytes."""

    can_trim = True
    can_fua = True
    can_flush = True
    can_write_zeroes = True
    can_multi_conn = True  # one mapping shared by every connection, no per-connection cache
    can_fast_zero = True  # zeroing memory beats receiving and copying a payload of zeroes
    eager = True

    def __init__(self, size: int) -> None:
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        self._size = size
        self._map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        # madvise(MADV_DONTNEED) frees pages and makes them read back as zero, but the
        # kernel refuses it (EINVAL) on mlock()ed memory, which is the normal case for
        # `remem client` (lock_memory). Then trims become no-ops and zeroing writes zeroes.
        self._can_discard = True

    def size(self) -> int:
        return self._size

    async def pread(self, offset: int, length: int) -> bytes:
        return self._map[offset : offset + length]

    async def pwrite(self, offset: int, data: memoryview, fua: bool) -> None:
        self._map[offset : offset + len(data)] = data

    async def flush(self) -> None:
        return None

    async def trim(self, offset: int, length: int) -> None:
        # A trim is a hint: only whole pages are given back, the edges are left alone.
        self._discard_pages(offset, offset + length)

    async def zero(self, offset: int, length: int, may_trim: bool) -> None:
        end = offset + length
        start_page = -(-offset // PAGE_SIZE) * PAGE_SIZE
        end_page = end // PAGE_SIZE * PAGE_SIZE
        if may_trim and start_page < end_page and self._discard_pages(start_page, end_page):
            self._fill_zero(offset, start_page)
            self._fill_zero(end_page, end)
        else:
            self._fill_zero(offset, end)

    async def close(self) -> None:
        self._map.close()

    def _discard_pages(self, start: int, end: int) -> bool:
        """Free the whole pages inside [start, end); True if they now read as zeroes."""
        start = -(-start // PAGE_SIZE) * PAGE_SIZE
        end = end // PAGE_SIZE * PAGE_SIZE
        if start >= end or not self._can_discard:
            return False
        try:
            self._map.madvise(mmap.MADV_DONTNEED, start, end - start)
        except OSError as exc:
            self._can_discard = False
            log.info("memory backend: madvise(MADV_DONTNEED) refused (%s); trim is a no-op", exc)
            return False
        return True

    def _fill_zero(self, start: int, end: int) -> None:
        chunk = len(_ZERO_CHUNK)
        while start < end:
            step = min(chunk, end - start)
            self._map[start : start + step] = _ZERO_CHUNK[:step]
            start += step

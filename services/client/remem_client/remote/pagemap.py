"""What the client knows of each device page: ever written, and held by the mirror alone.

State kept on the client is small and flat: one bit per device page saying whether it was
ever written (a page never written reads as zeros without network traffic). That is 32 KiB
per GiB of device, against the seed's per-page bitfield. A second bitmap, `unreplicated`,
marks pages whose newest data only the mirror holds (written while the network was down):
another 32 KiB per GiB, allocated at the first such write and freed once every page is
resynced, so a healthy client spends nothing on it. Slabs adopted from placement's map at a
restart are `unknown`: which of their pages were written is not known here, so their
unmarked pages may hold data too.

Plain data, no asyncio: the rest of the backend asks and updates; nothing here waits.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from remem_common.protocol.pages import MAX_BATCH_PAGES, SLAB_PAGES

BoolArray = np.ndarray[Any, np.dtype[np.bool_]]


class PageMap:
    """Per-page bits (written, unreplicated) and per-slab `unknown` flags of one device."""

    def __init__(self, page_count: int) -> None:
        self.page_count = page_count
        self.slab_count = -(-page_count // SLAB_PAGES)
        self.written = np.zeros(-(-page_count // 8), dtype=np.uint8)
        # Slabs adopted from placement's map at start (a restarted client): their unmarked
        # pages are looked up on the replicas, and a page no replica holds reads as zeros.
        self.unknown = np.zeros(self.slab_count, dtype=np.bool_)
        # Pages whose newest data only the mirror holds (None while there is none).
        self.unreplicated: np.ndarray[Any, np.dtype[np.uint8]] | None = None
        self.unreplicated_pages = 0

    def nbytes(self) -> int:
        """Client memory the bitmaps take."""
        extra = self.unreplicated.nbytes if self.unreplicated is not None else 0
        return int(self.written.nbytes + extra)

    # -- written ---------------------------------------------------------------------------

    def written_mask(self, first: int, count: int) -> BoolArray:
        return bits_of(self.written, first, count)

    def written_bits(self, first: int, count: int) -> int:
        """Bit i set if page first + i is marked written (a Python int: no numpy call)."""
        byte0 = first >> 3
        raw = int.from_bytes(self.written[byte0 : ((first + count - 1) >> 3) + 1], "little")
        return (raw >> (first & 7)) & ((1 << count) - 1)

    def maybe_written(self, first: int, count: int) -> BoolArray:
        """Pages that may hold data: marked written, or in a slab adopted after a restart."""
        written = self.written_mask(first, count)
        if self.unknown.any():
            for seg_first, seg_count in slab_segments(first, count):
                if self.unknown[seg_first // SLAB_PAGES]:
                    written[seg_first - first : seg_first - first + seg_count] = True
        return written

    def set_written(self, first: int, count: int, value: bool) -> None:
        set_bits(self.written, first, count, value)

    def written_pages(self) -> int:
        return int(np.unpackbits(self.written).sum())

    def written_anywhere(self) -> bool:
        """Some page may be written (marked, or in a slab adopted with unknown contents)."""
        return bool(self.maybe_written(0, self.page_count).any())

    # -- unreplicated ----------------------------------------------------------------------

    def set_unreplicated(self, first: int, count: int, value: bool) -> None:
        if self.unreplicated is None:
            if not value:
                return
            self.unreplicated = np.zeros_like(self.written)
        before = set_bits(self.unreplicated, first, count, value)
        self.unreplicated_pages += (count - before) if value else -before
        if not self.unreplicated_pages:
            self.unreplicated = None

    def any_unreplicated(self, first: int, count: int) -> bool:
        if not self.unreplicated_pages or self.unreplicated is None:
            return False
        byte0, byte1 = first >> 3, ((first + count - 1) >> 3) + 1
        raw = int.from_bytes(self.unreplicated[byte0:byte1], "little")
        return bool((raw >> (first & 7)) & ((1 << count) - 1))

    def unreplicated_mask(self, first: int, count: int) -> BoolArray:
        """Pages of [first, first + count) only the mirror holds (all False if none)."""
        if self.unreplicated is None:
            return np.zeros(count, dtype=np.bool_)
        return bits_of(self.unreplicated, first, count)

    def unreplicated_list(self) -> np.ndarray[Any, np.dtype[np.intp]]:
        """Every mirror-only page number, ascending."""
        if self.unreplicated is None:
            return np.zeros(0, dtype=np.intp)
        bits = np.unpackbits(self.unreplicated, bitorder="little")[: self.page_count]
        return np.flatnonzero(bits)

    def adopt_unreplicated(self, bitmap: bytes) -> int:
        """Adopt the mirror's list of mirror-only pages (a restarted client), marking them
        written too; returns how many pages are mirror-only now."""
        theirs = np.frombuffer(bitmap, dtype=np.uint8)[: self.written.shape[0]]
        if not theirs.any():
            return self.unreplicated_pages
        if self.unreplicated is None:
            self.unreplicated = np.zeros_like(self.written)
        self.unreplicated[: theirs.shape[0]] |= theirs
        self.written[: theirs.shape[0]] |= theirs
        self.unreplicated_pages = int(np.unpackbits(self.unreplicated).sum())
        return self.unreplicated_pages


def set_bits(bitmap: np.ndarray[Any, Any], first: int, count: int, value: bool) -> int:
    """Set or clear bits [first, first + count); returns how many were set before."""
    byte0, byte1 = first // 8, (first + count - 1) // 8 + 1
    if byte1 - byte0 <= 16:
        # A few bytes (every swap-sized write) as a Python int: no numpy call, each of
        # which costs microseconds.
        raw = int.from_bytes(bitmap[byte0:byte1], "little")
        mask = ((1 << count) - 1) << (first & 7)
        before = (raw & mask).bit_count()
        raw = raw | mask if value else raw & ~mask
        bitmap.data[byte0:byte1] = raw.to_bytes(byte1 - byte0, "little")
        return before
    bits = np.unpackbits(bitmap[byte0:byte1], bitorder="little")
    start = first - byte0 * 8
    before = int(bits[start : start + count].sum())
    bits[start : start + count] = value
    bitmap[byte0:byte1] = np.packbits(bits, bitorder="little")
    return before


def bits_of(bitmap: np.ndarray[Any, Any], first: int, count: int) -> np.ndarray[Any, Any]:
    """Bits [first, first + count) as booleans."""
    byte0, byte1 = first // 8, (first + count - 1) // 8 + 1
    bits = np.unpackbits(bitmap[byte0:byte1], bitorder="little")
    start = first - byte0 * 8
    return bits[start : start + count].astype(np.bool_)


def runs(pages: np.ndarray[Any, Any]) -> list[tuple[int, int]]:
    """Sorted page numbers as runs of consecutive pages: [(first, count), ...]."""
    if not pages.size:
        return []
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [pages.size]))
    return [(int(pages[a]), int(b - a)) for a, b in zip(starts, ends, strict=True)]


def slab_segments(first: int, count: int) -> list[tuple[int, int]]:
    """Split pages [first, first + count) at slab boundaries and into runs a batch message
    can carry: [(first, count), ...]."""
    segments = []
    end = first + count
    while first < end:
        stop = min(end, (first // SLAB_PAGES + 1) * SLAB_PAGES, first + MAX_BATCH_PAGES)
        segments.append((first, stop - first))
        first = stop
    return segments

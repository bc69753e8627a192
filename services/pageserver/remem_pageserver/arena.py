"""The page server's arena file: its layout and header, its mapping, and the commit and punch
of its regions' memory.

This module knows bytes and offsets, not pages' owners: which slots are free is the region
allocator's (regions.py), whose page a slot holds the slab index's (index.py).

Arena file (under /dev/shm by default, so it lives in RAM and outlives the process)::

    offset 0        header (4 KiB): magic, format, page size, capacity, region offsets
    offset 4 KiB    tenant table: 1024 entries x 64 bytes (length byte + UTF-8 name)
    slots_offset    slot table: capacity x 48-byte records (SLOT_DTYPE)
    data_offset     page data: capacity x 4096 bytes, 4 KiB aligned

A slot record says which (tenant, volume, slab, page) the page in the same-numbered data slot
belongs to, its CRC-32C, and its seal (the client's AES-GCM nonce and tag, 28 bytes, opaque
here: kept in the arena so a restarted server still returns pages their client can decrypt).
Format 2 added the seal (format 1 records were 24 bytes); a format 1 arena is refused.

The file is sparse. Slots are grouped in regions of REGION_PAGES (1 MiB of pages and the
12 KiB of their slot records); a region's memory is committed (posix_fallocate) and mapped
when the allocator first needs it, and punched out (MADV_REMOVE) when it holds no page. The
holes read as zeros, i.e. free slot records. The header and tenant table are always
committed. A page server killed with SIGKILL leaves the file intact (it is shared memory, not
process memory); the next start reads the slot table with pread, which does not commit the
holes it reads.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
from remem_common.locking import lock_exclusive
from remem_common.protocol.pages import PAGE_SIZE, SEAL_BYTES, PageArray, U32Array

MAGIC = b"REMEMPS\x01"
FORMAT_VERSION = 2
HEADER = struct.Struct("<8sIIQQQ")  # magic, format, page size, capacity, slots_off, data_off
HEADER_BYTES = 4096
TENANT_ENTRIES = 1024
TENANT_ENTRY_BYTES = 64
TENANTS_OFFSET = HEADER_BYTES
SLOTS_OFFSET = TENANTS_OFFSET + TENANT_ENTRIES * TENANT_ENTRY_BYTES

SLOT_FREE = 0
SLOT_USED = 1
SLOT_DTYPE = np.dtype(
    [
        ("state", "<u2"),
        ("tenant", "<u2"),
        ("volume", "<u4"),
        ("slab", "<u4"),
        ("page", "<u4"),
        ("crc", "<u4"),
        ("seal", "u1", (SEAL_BYTES,)),
    ]
)
assert SLOT_DTYPE.itemsize == 48

# Data slots per region, the unit in which RAM is committed and given back: 1 MiB of pages
# and 12 KiB of slot records (a whole number of 4 KiB pages, so regions punch cleanly), 64
# regions a slab. Smaller means less committed and unused per slab; larger, fewer
# fallocate/madvise calls per page.
REGION_PAGES = 256
assert REGION_PAGES * SLOT_DTYPE.itemsize % PAGE_SIZE == 0
# madvise(MADV_POPULATE_WRITE), Linux 5.14; Python 3.11's mmap module does not name it.
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
# Slots handled at a time while reading the slot table at start (3 MiB of records, 256
# regions), here and in the allocator's rebuild: the temporaries stay small enough not to
# linger in the process's heap afterwards. Read as arena.REBUILD_CHUNK at call time, so a
# test can shrink it for both.
REBUILD_CHUNK = 65536
assert REBUILD_CHUNK % REGION_PAGES == 0

SlabKey = tuple[int, int, int]  # (tenant id, volume, slab), as in a slot record
Int32Array = npt.NDArray[np.int32]
# posix_fallocate(fd, offset, length): commits a file range, OSError (ENOSPC) if it cannot.
Allocate = Callable[[int, int, int], None]


class StoreError(Exception):
    """Base of the store's refusals."""


class NoSpaceError(StoreError):
    """The arena (or the tenant table, or the host's memory) is full; nothing of the request
    was stored."""


class ArenaError(StoreError):
    """The arena file cannot be used as it is (wrong format, other capacity, locked)."""


def _align(value: int, to: int = PAGE_SIZE) -> int:
    return (value + to - 1) // to * to


def arena_layout(capacity_pages: int) -> tuple[int, int, int]:
    """(slots offset, data offset, file size) for an arena of `capacity_pages` pages."""
    data_offset = _align(SLOTS_OFFSET + capacity_pages * SLOT_DTYPE.itemsize)
    return SLOTS_OFFSET, data_offset, data_offset + capacity_pages * PAGE_SIZE


def region_count(capacity_pages: int) -> int:
    """Regions of an arena of `capacity_pages` pages (the last one may be short)."""
    return -(-capacity_pages // REGION_PAGES)


def runs(mask: npt.NDArray[np.bool_]) -> list[tuple[int, int]]:
    """(first, end) of every run of True in `mask`."""
    edges = np.flatnonzero(np.diff(np.concatenate(([False], mask, [False])).astype(np.int8)))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


class Arena:
    """One arena file, locked and mapped, with numpy views of its tables.

    Attributes:
        slots: the slot table (SLOT_DTYPE records), and two of its columns made once as
            views, `crc` and `seal` (a structured field lookup costs a microsecond or two
            per call, and a GET gathers both).
        data: (capacity, 4096) page data.
        tenant_table: (TENANT_ENTRIES, TENANT_ENTRY_BYTES) length byte + name.
    """

    def __init__(
        self, path: Path, capacity_pages: int, *, forget: bool, allocate: Allocate
    ) -> None:
        """Open (or create) the arena at `path`; see PageStore for the arguments.

        Raises:
            ArenaError: the file is another format or capacity, another process holds it, or
                the host cannot commit its header.
        """
        if capacity_pages < 1:
            raise ArenaError("capacity must be at least one page")
        self.path = path
        self.capacity_pages = capacity_pages
        self._allocate = allocate
        slots_offset, data_offset, file_size = arena_layout(capacity_pages)
        self._data_offset = data_offset
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        if not lock_exclusive(self._fd):
            raise ArenaError(f"{path} is in use by another page server")
        existing_size = os.fstat(self._fd).st_size
        fresh = forget or existing_size == 0
        if not fresh:
            self._check_header(file_size, slots_offset, data_offset)
        if fresh:
            os.ftruncate(self._fd, 0)  # drop old contents: a wiped arena holds nothing
            os.ftruncate(self._fd, file_size)  # sparse: regions are committed as slabs fill
        try:
            allocate(self._fd, 0, slots_offset)  # the header and tenant table, always
        except OSError as exc:
            os.close(self._fd)
            raise ArenaError(f"cannot allocate {slots_offset} bytes for {path}: {exc}") from None
        # Not MAP_POPULATE: touching a hole of a tmpfs mapping, even to read, commits a page,
        # so pages are mapped region by region as they are committed (commit).
        self._mmap = mmap.mmap(self._fd, file_size, mmap.MAP_SHARED)
        self._can_populate = True
        self._can_punch = True
        self._populate(0, slots_offset)
        self.slots: npt.NDArray[np.void] = np.ndarray(
            (capacity_pages,), dtype=SLOT_DTYPE, buffer=self._mmap, offset=slots_offset
        )
        self.crc: U32Array = self.slots["crc"]
        self.seal: PageArray = self.slots["seal"]
        self.data: PageArray = np.ndarray(
            (capacity_pages, PAGE_SIZE), dtype=np.uint8, buffer=self._mmap, offset=data_offset
        )
        self.tenant_table: npt.NDArray[np.uint8] = np.ndarray(
            (TENANT_ENTRIES, TENANT_ENTRY_BYTES),
            dtype=np.uint8,
            buffer=self._mmap,
            offset=TENANTS_OFFSET,
        )
        if fresh:
            # The magic goes in last: a file killed during creation is recognised as unusable
            # rather than trusted.
            self._mmap[: HEADER.size] = HEADER.pack(
                MAGIC, FORMAT_VERSION, PAGE_SIZE, capacity_pages, slots_offset, data_offset
            )

    # -- opening ---------------------------------------------------------------------------

    def _check_header(self, file_size: int, slots_offset: int, data_offset: int) -> None:
        raw = os.pread(self._fd, HEADER.size, 0)
        if len(raw) < HEADER.size:
            self._refuse("is too short to be a page server arena")
        magic, fmt, page_size, capacity, slots_off, data_off = HEADER.unpack(raw)
        if magic != MAGIC or fmt != FORMAT_VERSION or page_size != PAGE_SIZE:
            self._refuse("is not a remem arena of this format")
        if (capacity, slots_off, data_off) != (self.capacity_pages, slots_offset, data_offset):
            self._refuse(f"holds {capacity} pages but --capacity asks for {self.capacity_pages}")
        if os.fstat(self._fd).st_size != file_size:
            self._refuse("has the wrong size")

    def _refuse(self, why: str) -> None:
        os.close(self._fd)
        raise ArenaError(f"arena {self.path} {why}; start with --forget to wipe it")

    def used_slots(self) -> Int32Array:
        """Slots whose record says used, with the regions holding them committed.

        The records are read with pread: unlike a read through the mapping, it does not
        commit the holes it reads (they read as zeros: free). Then the regions holding them
        are committed (again) before anyone reads them through the mapping: a crash may have
        cut a commit short, and a page read or written there must not be a hole.

        Raises:
            ArenaError: the host cannot commit the memory these pages already use.
        """
        found: list[Int32Array] = []
        record = SLOT_DTYPE.itemsize
        for start in range(0, self.capacity_pages, REBUILD_CHUNK):
            count = min(REBUILD_CHUNK, self.capacity_pages - start)
            raw = os.pread(self._fd, count * record, SLOTS_OFFSET + start * record)
            states = np.frombuffer(raw, dtype=SLOT_DTYPE)["state"]
            found.append((start + np.flatnonzero(states == SLOT_USED)).astype(np.int32))
        used = np.concatenate(found)
        holding = np.zeros(region_count(self.capacity_pages), dtype=np.bool_)
        holding[used // REGION_PAGES] = True
        for first, end in runs(holding):
            try:
                self.commit(first, end)
            except OSError as exc:
                raise ArenaError(f"cannot commit the pages of {self.path}: {exc}") from None
        return used

    # -- regions' memory -------------------------------------------------------------------

    def span(self, first: int, end: int) -> tuple[int, int, int, int]:
        """File offsets (records start, records end, data start, data end) of the regions
        first..end-1; every bound is a multiple of 4 KiB."""
        last_slot = min(end * REGION_PAGES, self.capacity_pages)
        record = SLOT_DTYPE.itemsize
        records_end = (
            self._data_offset  # the last region's records run to the 4 KiB-aligned data
            if last_slot == self.capacity_pages
            else SLOTS_OFFSET + last_slot * record
        )
        return (
            SLOTS_OFFSET + first * REGION_PAGES * record,
            records_end,
            self._data_offset + first * REGION_PAGES * PAGE_SIZE,
            self._data_offset + last_slot * PAGE_SIZE,
        )

    def commit(self, first: int, end: int) -> None:
        """Commit host memory for regions first..end-1 and map it.

        Raises:
            OSError: the host cannot (ENOSPC from a full /dev/shm); part of the span may be
                committed, which the caller punches if those regions hold nothing.
        """
        records_start, records_end, data_start, data_end = self.span(first, end)
        self._allocate(self._fd, records_start, records_end - records_start)
        self._allocate(self._fd, data_start, data_end - data_start)
        # Map the pages in one call now: first writes faulting them in one by one cost more
        # (measured here: commit and write 2.7 us a page this way, 4.1 by faults).
        self._populate(records_start, records_end - records_start)
        self._populate(data_start, data_end - data_start)

    def _populate(self, start: int, length: int) -> None:
        if not self._can_populate or not length:
            return
        try:
            self._mmap.madvise(MADV_POPULATE_WRITE, start, length)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self._can_populate = False  # before Linux 5.14: pages fault in on first write

    def punch(self, first: int, end: int) -> None:
        """Give the memory of regions first..end-1 back to the host (they hold no page)."""
        if not self._can_punch:
            return
        records_start, records_end, data_start, data_end = self.span(first, end)
        try:
            # On a shared tmpfs mapping MADV_REMOVE is fallocate(PUNCH_HOLE): the pages are
            # freed and read as zeros (free slots) afterwards.
            self._mmap.madvise(mmap.MADV_REMOVE, records_start, records_end - records_start)
            self._mmap.madvise(mmap.MADV_REMOVE, data_start, data_end - data_start)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            self._can_punch = False  # a file system without holes: the memory stays committed

    @property
    def committed_bytes(self) -> int:
        """Host memory the arena file holds now (its allocated blocks)."""
        return os.fstat(self._fd).st_blocks * 512

    def close(self) -> None:
        """Flush and unmap the arena (the file stays for the next start; a hole in it reads
        as free slots)."""
        # Drop numpy views before closing the mmap they point into.
        del self.slots, self.crc, self.seal, self.data, self.tenant_table
        self._mmap.flush()
        self._mmap.close()
        os.close(self._fd)

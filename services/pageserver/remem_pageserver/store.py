"""The page store: 4 KiB pages of many tenants in one file-backed arena, indexed per slab,
RAM committed as slabs fill.

No transport code here: the server module decodes frames and calls these methods with numpy
arrays; nothing in the store is per-page Python objects, except for batches of a few pages
(`get_small`, `overwrite_small`), which a few bytes copies serve faster than numpy calls
of a microsecond each. PageStore is the facade over three
parts, each owning its state, which it calls once or twice a batch:

    arena.py    the arena file: layout, header, mapping, commit and punch of region memory
    index.py    the slab index (slot of each page) and the tenant table
    regions.py  the slot allocator: free slots per region, regions' commitment and owners

The arena file outlives the process (it is in /dev/shm); a restart rebuilds the index and
the allocator from its slot table. Stores are ordered so that a kill mid-request leaves
either the old page or a page whose checksum does not match (the reader then fails over); a
request is only acknowledged after all its stores. A PUT that the host has no memory for is
answered "no space" with nothing stored, never a SIGBUS.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from remem_common.protocol.pages import (
    PAGE_SIZE,
    SEAL_BYTES,
    KeyArray,
    PageArray,
    U32Array,
)

from remem_pageserver.arena import (
    FORMAT_VERSION,
    HEADER,
    HEADER_BYTES,
    MAGIC,
    REGION_PAGES,
    SLOT_DTYPE,
    SLOT_FREE,
    SLOT_USED,
    SLOTS_OFFSET,
    TENANT_ENTRIES,
    TENANT_ENTRY_BYTES,
    TENANTS_OFFSET,
    Allocate,
    Arena,
    ArenaError,
    Int32Array,
    NoSpaceError,
    SlabKey,
    StoreError,
    arena_layout,
)
from remem_pageserver.index import SlabIndex, slab_groups
from remem_pageserver.regions import RegionAllocator

# The arena's format and errors, importable from here as before the store was split.
__all__ = [
    "FORMAT_VERSION",
    "HEADER",
    "HEADER_BYTES",
    "MAGIC",
    "REGION_PAGES",
    "SLOTS_OFFSET",
    "SLOT_DTYPE",
    "SLOT_FREE",
    "SLOT_USED",
    "TENANTS_OFFSET",
    "TENANT_ENTRIES",
    "TENANT_ENTRY_BYTES",
    "ArenaError",
    "GetResult",
    "NoSpaceError",
    "PageStore",
    "StoreError",
    "arena_layout",
]


# Where a slot record keeps a page's checksum and seal (SLOT_DTYPE), for the byte views.
RECORD_BYTES = SLOT_DTYPE.itemsize
_SLOT_FIELDS = SLOT_DTYPE.fields
assert _SLOT_FIELDS is not None
CRC_AT: int = _SLOT_FIELDS["crc"][1]
SEAL_AT: int = _SLOT_FIELDS["seal"][1]
CRC_BYTES = 4
_CRC = struct.Struct("<I")


@dataclass(frozen=True)
class GetResult:
    """Pages read: found (bool each), checksums (0 where absent), data and seals (zeros where
    absent)."""

    found: npt.NDArray[np.bool_]
    crcs: U32Array
    data: PageArray
    seals: PageArray


class PageStore:
    """Pages of many tenants in one arena file; see arena.py for the layout."""

    def __init__(
        self,
        path: Path,
        capacity_pages: int,
        *,
        forget: bool = False,
        allocate: Allocate = os.posix_fallocate,
    ) -> None:
        """Open (or create) the arena at `path`.

        Args:
            path: arena file; its directory must exist (e.g. /dev/shm).
            capacity_pages: pages the arena holds; must match an existing arena's.
            forget: wipe whatever the file holds and start empty.
            allocate: commits a range of the file (posix_fallocate); tests pass one that
                fails to see a full host answered with NoSpaceError.

        Raises:
            ArenaError: the file is another format or capacity, another process holds it, or
                the host cannot commit the memory its pages already use.
        """
        self._arena = Arena(path, capacity_pages, forget=forget, allocate=allocate)
        self.path = path
        self.capacity_pages = capacity_pages
        try:
            self._index = SlabIndex(self._arena)
            used = self._index.rebuild(self._arena.used_slots())
            self._regions = RegionAllocator(self._arena, used)
        except BaseException:
            self._arena.close()
            raise
        # Flat byte views of the page data and the slot records, for small batches.
        self._data_bytes = self._arena.data.reshape(-1).data
        self._record_bytes = self._arena.slots.view(np.uint8).data

    # -- accounting ------------------------------------------------------------------------

    @property
    def used_pages(self) -> int:
        return self.capacity_pages - self._regions.free_slots

    @property
    def free_pages(self) -> int:
        return self._regions.free_slots

    @property
    def committed_bytes(self) -> int:
        """Host memory the arena file holds now (its allocated blocks)."""
        return self._arena.committed_bytes

    @property
    def committed_regions(self) -> int:
        return self._regions.committed_regions

    @property
    def slab_count(self) -> int:
        return self._index.slab_count

    def tenant_id(self, tenant: str, *, create: bool) -> int | None:
        """The arena's id of `tenant`; registered in the tenant table when `create`."""
        return self._index.tenant_id(tenant, create=create)

    def tenant_name(self, tenant_id: int) -> str:
        return self._index.tenant_name(tenant_id)

    # -- page operations -------------------------------------------------------------------

    def put(
        self,
        tenant: str,
        volume: int,
        keys: KeyArray,
        crcs: U32Array,
        pages: PageArray,
        seals: PageArray,
        *,
        overwrite: bool = True,
    ) -> tuple[int, int]:
        """Store pages; all or nothing.

        Args:
            tenant, volume: owner of the pages.
            keys: (slab, page) of each page, no duplicates (the codec checks).
            crcs: CRC-32C of each page, already verified against `pages` by the caller.
            pages: (N, 4096) page data.
            seals: (N, 28) seal of each page, stored as given.
            overwrite: False stores only pages not held yet (slab push onto a live replica).

        Returns:
            (stored, skipped): pages written, and pages left alone because held and not
            `overwrite`.

        Raises:
            NoSpaceError: the new pages do not fit; nothing was written.
        """
        index = self._index
        tenant_id = index.tenant_id(tenant, create=True)
        assert tenant_id is not None
        slots = index.lookup(tenant_id, volume, keys)
        missing = slots < 0
        new_count = int(np.count_nonzero(missing))
        free = self._regions.free_slots
        if new_count > free:
            raise NoSpaceError(
                f"{new_count} new pages do not fit: {free} of {self.capacity_pages} pages free"
            )
        skipped = 0
        if not overwrite:
            skipped = keys.shape[0] - new_count
            keys, crcs, pages = keys[missing], crcs[missing], pages[missing]
            seals = seals[missing]
            slots, missing = slots[missing], np.ones(new_count, dtype=np.bool_)
        arena = self._arena
        records = arena.slots
        if new_count:
            new_keys = keys[missing]
            groups = slab_groups(new_keys["slab"])
            try:
                fresh = self._regions.allocate(tenant_id, volume, groups)
            except NoSpaceError:
                # An orphan region adopted meanwhile holds only other slabs' pages: a slab
                # of the batch that holds none must not keep it.
                for slab, _ in groups:
                    self._disown_if_empty((tenant_id, volume, slab))
                raise
            slots[missing] = fresh
            # Key fields before the state flag: a slot is only "used" once it says whose.
            records["tenant"][fresh] = tenant_id
            records["volume"][fresh] = volume
            records["slab"][fresh] = new_keys["slab"]
            records["page"][fresh] = new_keys["page"]
        # Data and seal before checksum: a kill in between leaves a mismatch the reader
        # detects.
        start = _run_start(slots)
        if start is None:
            arena.data[slots] = pages
        else:
            arena.data[start : start + slots.shape[0]] = pages
        records["seal"][slots] = seals
        records["crc"][slots] = crcs
        if new_count:
            records["state"][fresh] = SLOT_USED
            index.insert(tenant_id, volume, groups, new_keys["page"], fresh)
        return int(keys.shape[0]), skipped

    def get(self, tenant: str, volume: int, keys: KeyArray) -> GetResult:
        """Read pages; absent ones come back as zeros with found=False and checksum 0."""
        count = keys.shape[0]
        tenant_id = self._index.tenant_id(tenant, create=False)
        if tenant_id is None:
            return GetResult(
                np.zeros(count, dtype=np.bool_),
                np.zeros(count, dtype=np.uint32),
                np.zeros((count, PAGE_SIZE), dtype=np.uint8),
                np.zeros((count, SEAL_BYTES), dtype=np.uint8),
            )
        slots = self._index.lookup(tenant_id, volume, keys)
        found = slots >= 0
        arena = self._arena
        if found.all():
            # One gather copy out of the arena: the reply owns its bytes, so a later write
            # to the same page cannot change data already handed to the socket.
            start = _run_start(slots)
            data = (
                arena.data[slots]
                if start is None
                else arena.data[start : start + slots.shape[0]].copy()
            )
            return GetResult(found, arena.crc[slots], data, arena.seal[slots])
        data = np.zeros((count, PAGE_SIZE), dtype=np.uint8)
        crcs = np.zeros(count, dtype=np.uint32)
        seals = np.zeros((count, SEAL_BYTES), dtype=np.uint8)
        hit = slots[found]
        data[found] = arena.data[hit]
        crcs[found] = arena.crc[hit]
        seals[found] = arena.seal[hit]
        return GetResult(found, crcs, data, seals)

    def get_small(
        self, tenant: str, volume: int, keys: tuple[int, ...]
    ) -> tuple[bytes, bytes, bytes, bytes]:
        """`get` of a small batch, its keys as words (slab, page, slab, page, ...), read with
        a copy per page rather than numpy; returns the reply's frames: found (a byte each),
        checksums, data and seals, as `get` returns them."""
        tenant_id = self._index.tenant_id(tenant, create=False)
        count = len(keys) // 2
        if tenant_id is None:
            return (
                bytes(count),
                bytes(count * CRC_BYTES),
                bytes(count * PAGE_SIZE),
                bytes(count * SEAL_BYTES),
            )
        slots = self._index.lookup_words(tenant_id, volume, keys)
        data, records = self._data_bytes, self._record_bytes
        if count == 1 and slots[0] >= 0:
            slot = slots[0]
            record = slot * RECORD_BYTES
            return (
                b"\x01",
                bytes(records[record + CRC_AT : record + CRC_AT + CRC_BYTES]),
                bytes(data[slot * PAGE_SIZE : (slot + 1) * PAGE_SIZE]),
                bytes(records[record + SEAL_AT : record + SEAL_AT + SEAL_BYTES]),
            )
        found: list[int] = []
        crcs: list[bytes | memoryview] = []
        pages: list[bytes | memoryview] = []
        seals: list[bytes | memoryview] = []
        for slot in slots:
            if slot < 0:
                found.append(0)
                crcs.append(bytes(CRC_BYTES))
                pages.append(bytes(PAGE_SIZE))
                seals.append(bytes(SEAL_BYTES))
                continue
            record = slot * RECORD_BYTES
            found.append(1)
            crcs.append(records[record + CRC_AT : record + CRC_AT + CRC_BYTES])
            pages.append(data[slot * PAGE_SIZE : (slot + 1) * PAGE_SIZE])
            seals.append(records[record + SEAL_AT : record + SEAL_AT + SEAL_BYTES])
        return bytes(found), b"".join(crcs), b"".join(pages), b"".join(seals)

    def overwrite_small(
        self,
        tenant: str,
        volume: int,
        keys: tuple[int, ...],
        crcs: tuple[int, ...],
        pages: memoryview,
        seals: memoryview,
    ) -> int | None:
        """`put` of a small batch whose pages are all held already, without numpy: keys as
        words (slab, page, ...), pages and seals back to back. Returns the pages stored, or
        None, storing nothing, if some page is new (then `put` stores the batch)."""
        tenant_id = self._index.tenant_id(tenant, create=False)
        if tenant_id is None:
            return None
        slots = self._index.lookup_words(tenant_id, volume, keys)
        if -1 in slots:
            return None
        data, records = self._data_bytes, self._record_bytes
        # Data and seal before checksum, as in `put`.
        for index, slot in enumerate(slots):
            data[slot * PAGE_SIZE : (slot + 1) * PAGE_SIZE] = pages[
                index * PAGE_SIZE : (index + 1) * PAGE_SIZE
            ]
            record = slot * RECORD_BYTES + SEAL_AT
            records[record : record + SEAL_BYTES] = seals[
                index * SEAL_BYTES : (index + 1) * SEAL_BYTES
            ]
        for slot, crc in zip(slots, crcs, strict=True):
            _CRC.pack_into(records, slot * RECORD_BYTES + CRC_AT, crc)
        return len(slots)

    def delete(self, tenant: str, volume: int, keys: KeyArray) -> int:
        """Free pages (trim); absent ones are ignored. Returns how many were freed."""
        tenant_id = self._index.tenant_id(tenant, create=False)
        if tenant_id is None:
            return 0
        freed = 0
        for key, slots, emptied in self._index.remove(tenant_id, volume, keys):
            self._release(key, slots, emptied)
            freed += slots.size
        return freed

    def _release(self, key: SlabKey, slots: Int32Array, emptied: bool) -> None:
        """Free the slots of pages the index no longer holds; `emptied`: their slab is gone."""
        # The state flag first: after a kill the slot is free, never half-owned.
        self._arena.slots["state"][slots] = SLOT_FREE
        self._regions.release(slots)
        if emptied:
            self._regions.disown(key)

    def _disown_if_empty(self, key: SlabKey) -> None:
        if not self._index.holds(key):
            self._regions.disown(key)

    # -- slab operations -------------------------------------------------------------------

    def inventory(self) -> list[tuple[str, int, int, int]]:
        """(tenant, volume, slab, pages held) for every slab held, sorted."""
        return self._index.inventory()

    def slab_pages(self, tenant: str, volume: int, slab: int) -> npt.NDArray[np.uint32]:
        """Page indices held of one slab, ascending."""
        tenant_id = self._index.tenant_id(tenant, create=False)
        if tenant_id is None:
            return np.empty(0, dtype=np.uint32)
        return self._index.slab_pages((tenant_id, volume, slab))

    def drop_slab(self, tenant: str, volume: int, slab: int) -> int:
        """Free every page of one slab; returns how many."""
        tenant_id = self._index.tenant_id(tenant, create=False)
        key = (tenant_id if tenant_id is not None else -1, volume, slab)
        held = self._index.drop(key)
        if held is None:
            return 0
        self._release(key, held, emptied=True)
        return int(held.size)

    def close(self) -> None:
        """Flush and unmap the arena (the file stays for the next start; a hole in it reads
        as free slots)."""
        self._data_bytes.release()
        self._record_bytes.release()
        self._arena.close()


# Batches of at least this many slots are checked for being one run (see _run_start).
RUN_CHECK_SLOTS = 16


def _run_start(slots: Int32Array) -> int | None:
    """The first slot if `slots` are consecutive and ascending (a large batch of a region
    written in order, as sequential page-outs are), else None: such a batch is copied to or
    from the arena as one block (4 MiB: 116 us instead of 153 as a copy per page)."""
    count = slots.shape[0]
    if count < RUN_CHECK_SLOTS:
        return None
    first = int(slots[0])
    if int(slots[-1]) - first != count - 1 or first < 0:
        return None
    return first if bool((np.diff(slots) == 1).all()) else None

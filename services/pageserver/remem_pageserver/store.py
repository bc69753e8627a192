"""The page store: 4 KiB pages in one preallocated, file-backed arena, indexed per slab.

No transport code here: the server module decodes frames and calls these methods with numpy
arrays; nothing in this module is per-page Python objects.

Arena file (under /dev/shm by default, so it lives in RAM and outlives the process)::

    offset 0        header (4 KiB): magic, format, page size, capacity, region offsets
    offset 4 KiB    tenant table: 1024 entries x 64 bytes (length byte + UTF-8 name)
    slots_offset    slot table: capacity x 48-byte records (SLOT_DTYPE)
    data_offset     page data: capacity x 4096 bytes, 4 KiB aligned

A slot record says which (tenant, volume, slab, page) the page in the same-numbered data slot
belongs to, its CRC-32C, and its seal (the client's AES-GCM nonce and tag, 28 bytes, opaque
here: kept in the arena so a restarted server still returns pages their client can decrypt).
Format 2 added the seal (format 1 records were 24 bytes); a format 1 arena is refused.

A page server killed with SIGKILL leaves the file intact (it is shared memory, not process
memory); the next start rebuilds the in-RAM index from the slot
table. Stores are ordered so that a kill mid-request leaves either the old page or a page whose
checksum does not match (the reader then fails over); a request is only acknowledged after
all its stores.

In RAM beside the arena: per held slab one int32 array of SLAB_PAGES slot numbers (-1 = not
held), i.e. 64 KiB per 64 MiB slab (0.1%), and a free-slot stack of 4 bytes per slot (0.1%).
"""

from __future__ import annotations

import fcntl
import itertools
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from remem_common.protocol.pages import (
    PAGE_SIZE,
    SEAL_BYTES,
    SLAB_PAGES,
    KeyArray,
    PageArray,
    U32Array,
)

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

SlabKey = tuple[int, int, int]  # (tenant id, volume, slab)
Int32Array = npt.NDArray[np.int32]


class StoreError(Exception):
    """Base of the store's refusals."""


class NoSpaceError(StoreError):
    """The arena (or the tenant table) is full; nothing of the request was stored."""


class ArenaError(StoreError):
    """The arena file cannot be used as it is (wrong format, other capacity, locked)."""


# Batches of at most this many keys are looked up in plain Python (see _lookup).
SMALL_LOOKUP = 16
_KEY = struct.Struct("<II")  # KEY_DTYPE: slab, page


@dataclass(frozen=True)
class GetResult:
    """Pages read: found (bool each), checksums (0 where absent), data and seals (zeros where
    absent)."""

    found: npt.NDArray[np.bool_]
    crcs: U32Array
    data: PageArray
    seals: PageArray


def _align(value: int, to: int = PAGE_SIZE) -> int:
    return (value + to - 1) // to * to


def arena_layout(capacity_pages: int) -> tuple[int, int, int]:
    """(slots offset, data offset, file size) for an arena of `capacity_pages` pages."""
    data_offset = _align(SLOTS_OFFSET + capacity_pages * SLOT_DTYPE.itemsize)
    return SLOTS_OFFSET, data_offset, data_offset + capacity_pages * PAGE_SIZE


class PageStore:
    """Pages of many tenants in one arena file; see the module docstring for the layout."""

    def __init__(self, path: Path, capacity_pages: int, *, forget: bool = False) -> None:
        """Open (or create) the arena at `path`.

        Args:
            path: arena file; its directory must exist (e.g. /dev/shm).
            capacity_pages: pages the arena holds; must match an existing arena's.
            forget: wipe whatever the file holds and start empty.

        Raises:
            ArenaError: the file is another format or capacity, or another process holds it.
        """
        if capacity_pages < 1:
            raise ArenaError("capacity must be at least one page")
        self.path = path
        self.capacity_pages = capacity_pages
        slots_offset, data_offset, file_size = arena_layout(capacity_pages)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise ArenaError(f"{path} is in use by another page server") from None
        existing_size = os.fstat(self._fd).st_size
        fresh = forget or existing_size == 0
        if not fresh:
            self._check_header(file_size, slots_offset, data_offset)
        if fresh:
            os.ftruncate(self._fd, 0)  # drop old contents: a wiped arena holds nothing
            os.ftruncate(self._fd, file_size)
        # Preallocate the whole arena and map it populated: a donor's RAM is committed at
        # start (a full /dev/shm fails here, not on some later PUT), and the PUT path never
        # takes a page fault, which costs ~20 us per 4 KiB page on these VMs.
        try:
            os.posix_fallocate(self._fd, 0, file_size)
        except OSError as exc:
            os.close(self._fd)
            raise ArenaError(f"cannot allocate {file_size} bytes for {path}: {exc}") from None
        self._mmap = mmap.mmap(self._fd, file_size, mmap.MAP_SHARED | mmap.MAP_POPULATE)
        self._slots: npt.NDArray[np.void] = np.ndarray(
            (capacity_pages,), dtype=SLOT_DTYPE, buffer=self._mmap, offset=slots_offset
        )
        # The two columns a GET gathers, as views made once (a structured field lookup costs
        # a microsecond or two per call).
        self._crc: U32Array = self._slots["crc"]
        self._seal: PageArray = self._slots["seal"]
        self._data: PageArray = np.ndarray(
            (capacity_pages, PAGE_SIZE), dtype=np.uint8, buffer=self._mmap, offset=data_offset
        )
        self._tenant_table: npt.NDArray[np.uint8] = np.ndarray(
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
        self._tenant_ids: dict[str, int] = {}
        self._slabs: dict[SlabKey, Int32Array] = {}
        self._slab_counts: dict[SlabKey, int] = {}
        self._free: Int32Array = np.empty(capacity_pages, dtype=np.int32)
        self._free_top = 0
        self._rebuild()

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

    def _rebuild(self) -> None:
        """Rebuild the tenant map, slab index and free stack from the arena's tables."""
        for tenant_id in range(TENANT_ENTRIES):
            length = int(self._tenant_table[tenant_id, 0])
            if length == 0:
                break
            name = bytes(self._tenant_table[tenant_id, 1 : 1 + length]).decode()
            self._tenant_ids[name] = tenant_id
        state = self._slots["state"]
        used_mask = state == SLOT_USED
        # A record whose key is impossible (unknown tenant, page past the slab) is garbage
        # from a kill during allocation: free it.
        used_mask &= self._slots["tenant"] < len(self._tenant_ids)
        used_mask &= self._slots["page"] < SLAB_PAGES
        stray = np.flatnonzero((state == SLOT_USED) & ~used_mask)
        if stray.size:
            self._slots["state"][stray] = SLOT_FREE
        used = np.flatnonzero(used_mask).astype(np.int32)
        if used.size:
            records = self._slots[used]
            order = np.lexsort((records["slab"], records["volume"], records["tenant"]))
            used, records = used[order], records[order]
            group_key = np.stack(
                [records["tenant"].astype(np.int64), records["volume"], records["slab"]], axis=1
            )
            starts = np.flatnonzero(np.any(np.diff(group_key, axis=0) != 0, axis=1)) + 1
            bounds = [0, *starts.tolist(), used.size]
            for begin, end in itertools.pairwise(bounds):
                key = (int(group_key[begin, 0]), int(group_key[begin, 1]), int(group_key[begin, 2]))
                slab_slots = np.full(SLAB_PAGES, -1, dtype=np.int32)
                slab_slots[records["page"][begin:end]] = used[begin:end]
                self._slabs[key] = slab_slots
                self._slab_counts[key] = int(np.count_nonzero(slab_slots >= 0))
                # Two records for one key cannot come from this code, but if a file has them
                # the later slot won above; free the loser so capacity is not lost.
                kept = slab_slots[records["page"][begin:end]]
                losers = used[begin:end][kept != used[begin:end]]
                if losers.size:
                    self._slots["state"][losers] = SLOT_FREE
        free = np.flatnonzero(self._slots["state"] != SLOT_USED).astype(np.int32)
        # Stack top at the end, lowest slot on top: fill the arena from its start.
        self._free_top = free.size
        self._free[: free.size] = free[::-1]

    # -- accounting ------------------------------------------------------------------------

    @property
    def used_pages(self) -> int:
        return self.capacity_pages - self._free_top

    @property
    def free_pages(self) -> int:
        return self._free_top

    @property
    def slab_count(self) -> int:
        return len(self._slabs)

    def tenant_id(self, tenant: str, *, create: bool) -> int | None:
        """The arena's id of `tenant`; registered in the tenant table when `create`."""
        tenant_id = self._tenant_ids.get(tenant)
        if tenant_id is not None or not create:
            return tenant_id
        tenant_id = len(self._tenant_ids)
        encoded = tenant.encode()
        if tenant_id >= TENANT_ENTRIES:
            raise NoSpaceError(f"tenant table full ({TENANT_ENTRIES} tenants)")
        if len(encoded) >= TENANT_ENTRY_BYTES:
            raise NoSpaceError("tenant name too long for the arena")
        row = self._tenant_table[tenant_id]
        row[1 : 1 + len(encoded)] = np.frombuffer(encoded, dtype=np.uint8)
        row[0] = len(encoded)  # length last: the entry exists only once complete
        self._tenant_ids[tenant] = tenant_id
        return tenant_id

    def tenant_name(self, tenant_id: int) -> str:
        for name, known in self._tenant_ids.items():
            if known == tenant_id:
                return name
        raise KeyError(tenant_id)

    # -- page operations -------------------------------------------------------------------

    @staticmethod
    def _slab_groups(slabs: npt.NDArray[np.uint32]) -> list[tuple[int, npt.NDArray[np.intp]]]:
        """(slab, positions in the batch) for each slab a batch touches."""
        if slabs.size and (slabs == slabs[0]).all():
            return [(int(slabs[0]), np.arange(slabs.size))]
        order = np.argsort(slabs, kind="stable")
        sorted_slabs = slabs[order]
        starts = np.flatnonzero(np.diff(sorted_slabs)) + 1
        bounds = [0, *starts.tolist(), slabs.size]
        return [
            (int(sorted_slabs[begin]), order[begin:end])
            for begin, end in itertools.pairwise(bounds)
        ]

    def _lookup(self, tenant_id: int, volume: int, keys: KeyArray) -> Int32Array:
        if keys.shape[0] <= SMALL_LOOKUP:
            # A few keys in plain Python: each numpy call below costs a microsecond or
            # more, and most reads the kernel makes are a page or a few.
            small: list[int] = []
            last_slab, slab_slots = -1, None
            for slab, page in _KEY.iter_unpack(keys.tobytes()):
                if slab != last_slab:
                    last_slab, slab_slots = slab, self._slabs.get((tenant_id, volume, slab))
                small.append(-1 if slab_slots is None else int(slab_slots[page]))
            return np.array(small, dtype=np.int32)
        groups = self._slab_groups(keys["slab"])
        if len(groups) == 1:
            # One slab (nearly every data-plane batch): one gather, no scatter.
            slab_slots = self._slabs.get((tenant_id, volume, groups[0][0]))
            if slab_slots is not None:
                found: Int32Array = slab_slots[keys["page"]]
                return found
        slots = np.full(keys.shape[0], -1, dtype=np.int32)
        pages = keys["page"]
        for slab, positions in groups:
            slab_slots = self._slabs.get((tenant_id, volume, slab))
            if slab_slots is not None:
                slots[positions] = slab_slots[pages[positions]]
        return slots

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
        tenant_id = self.tenant_id(tenant, create=True)
        assert tenant_id is not None
        slots = self._lookup(tenant_id, volume, keys)
        missing = slots < 0
        new_count = int(np.count_nonzero(missing))
        if new_count > self._free_top:
            raise NoSpaceError(
                f"{new_count} new pages do not fit: {self._free_top} of "
                f"{self.capacity_pages} pages free"
            )
        skipped = 0
        if not overwrite:
            skipped = keys.shape[0] - new_count
            keys, crcs, pages = keys[missing], crcs[missing], pages[missing]
            seals = seals[missing]
            slots, missing = slots[missing], np.ones(new_count, dtype=np.bool_)
        if new_count:
            top = self._free_top
            fresh = self._free[top - new_count : top][::-1].copy()
            self._free_top = top - new_count
            slots[missing] = fresh
            # Key fields before the state flag: a slot is only "used" once it says whose.
            self._slots["tenant"][fresh] = tenant_id
            self._slots["volume"][fresh] = volume
            self._slots["slab"][fresh] = keys["slab"][missing]
            self._slots["page"][fresh] = keys["page"][missing]
        # Data and seal before checksum: a kill in between leaves a mismatch the reader
        # detects.
        self._data[slots] = pages
        self._slots["seal"][slots] = seals
        self._slots["crc"][slots] = crcs
        if new_count:
            self._slots["state"][slots[missing]] = SLOT_USED
            new_keys = keys[missing]
            new_slots = slots[missing]
            for slab, positions in self._slab_groups(new_keys["slab"]):
                key = (tenant_id, volume, slab)
                slab_slots = self._slabs.get(key)
                if slab_slots is None:
                    slab_slots = np.full(SLAB_PAGES, -1, dtype=np.int32)
                    self._slabs[key] = slab_slots
                    self._slab_counts[key] = 0
                slab_slots[new_keys["page"][positions]] = new_slots[positions]
                self._slab_counts[key] += positions.size
        return int(keys.shape[0]), skipped

    def get(self, tenant: str, volume: int, keys: KeyArray) -> GetResult:
        """Read pages; absent ones come back as zeros with found=False and checksum 0."""
        count = keys.shape[0]
        tenant_id = self.tenant_id(tenant, create=False)
        if tenant_id is None:
            return GetResult(
                np.zeros(count, dtype=np.bool_),
                np.zeros(count, dtype=np.uint32),
                np.zeros((count, PAGE_SIZE), dtype=np.uint8),
                np.zeros((count, SEAL_BYTES), dtype=np.uint8),
            )
        slots = self._lookup(tenant_id, volume, keys)
        found = slots >= 0
        if found.all():
            # One gather copy out of the arena: the reply owns its bytes, so a later write
            # to the same page cannot change data already handed to the socket.
            return GetResult(found, self._crc[slots], self._data[slots], self._seal[slots])
        data = np.zeros((count, PAGE_SIZE), dtype=np.uint8)
        crcs = np.zeros(count, dtype=np.uint32)
        seals = np.zeros((count, SEAL_BYTES), dtype=np.uint8)
        hit = slots[found]
        data[found] = self._data[hit]
        crcs[found] = self._crc[hit]
        seals[found] = self._seal[hit]
        return GetResult(found, crcs, data, seals)

    def delete(self, tenant: str, volume: int, keys: KeyArray) -> int:
        """Free pages (trim); absent ones are ignored. Returns how many were freed."""
        tenant_id = self.tenant_id(tenant, create=False)
        if tenant_id is None:
            return 0
        freed = 0
        pages = keys["page"]
        for slab, positions in self._slab_groups(keys["slab"]):
            key = (tenant_id, volume, slab)
            slab_slots = self._slabs.get(key)
            if slab_slots is None:
                continue
            slab_pages = pages[positions]
            slots = slab_slots[slab_pages]
            held = slots >= 0
            freed_slots = slots[held]
            if not freed_slots.size:
                continue
            slab_slots[slab_pages[held]] = -1
            self._release(key, freed_slots)
            freed += freed_slots.size
        return freed

    def _release(self, key: SlabKey, slots: Int32Array) -> None:
        # The state flag first: after a kill the slot is free, never half-owned.
        self._slots["state"][slots] = SLOT_FREE
        top = self._free_top
        self._free[top : top + slots.size] = slots
        self._free_top = top + slots.size
        remaining = self._slab_counts[key] - slots.size
        if remaining:
            self._slab_counts[key] = remaining
        else:
            del self._slabs[key], self._slab_counts[key]

    # -- slab operations -------------------------------------------------------------------

    def inventory(self) -> list[tuple[str, int, int, int]]:
        """(tenant, volume, slab, pages held) for every slab held, sorted."""
        names = {tenant_id: name for name, tenant_id in self._tenant_ids.items()}
        return sorted(
            (names[tenant_id], volume, slab, count)
            for (tenant_id, volume, slab), count in self._slab_counts.items()
        )

    def slab_pages(self, tenant: str, volume: int, slab: int) -> npt.NDArray[np.uint32]:
        """Page indices held of one slab, ascending."""
        tenant_id = self.tenant_id(tenant, create=False)
        slab_slots = None if tenant_id is None else self._slabs.get((tenant_id, volume, slab))
        if slab_slots is None:
            return np.empty(0, dtype=np.uint32)
        return np.flatnonzero(slab_slots >= 0).astype(np.uint32)

    def drop_slab(self, tenant: str, volume: int, slab: int) -> int:
        """Free every page of one slab; returns how many."""
        tenant_id = self.tenant_id(tenant, create=False)
        key = (tenant_id if tenant_id is not None else -1, volume, slab)
        slab_slots = self._slabs.get(key)
        if slab_slots is None:
            return 0
        held = slab_slots[slab_slots >= 0]
        self._release(key, held)
        return int(held.size)

    def close(self) -> None:
        """Flush and unmap the arena (the file stays for the next start)."""
        # Drop numpy views before closing the mmap they point into.
        del self._slots, self._crc, self._seal, self._data, self._tenant_table
        self._mmap.flush()
        self._mmap.close()
        os.close(self._fd)

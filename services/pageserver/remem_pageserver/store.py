"""The page store: 4 KiB pages in one file-backed arena, indexed per slab, RAM committed as
slabs fill.

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

The file is sparse. Slots are grouped in regions of REGION_PAGES (1 MiB of pages and the
12 KiB of their slot records); a region's memory is committed (posix_fallocate) when a slab
first needs it and handed back to the host (MADV_REMOVE, i.e. a punched hole) as soon as its
last page is freed: a donor lends the RAM its pages use, not its whole --capacity. A slab
fills regions of its own, so dropping it (placement moved it away) empties whole regions.
When the host cannot commit a region (a full /dev/shm), the PUT takes free slots of other
slabs' regions and, failing that, is answered "no space" with nothing stored; a store never
writes into a hole, so a full host is never a SIGBUS. The layout is format 2's: a fully
allocated arena of an older version opens as it is, and gives back its free regions.

A page server killed with SIGKILL leaves the file intact (it is shared memory, not process
memory); the next start rebuilds the in-RAM index from the slot table (read with pread, which
does not commit the holes it reads). Stores are ordered so that a kill mid-request leaves
either the old page or a page whose checksum does not match (the reader then fails over); a
request is only acknowledged after all its stores.

In RAM beside the arena: per held slab one int32 array of SLAB_PAGES slot numbers (-1 = not
held), i.e. 64 KiB per 64 MiB slab (0.1%), and the free slots, 4 bytes per slot (0.1%), kept
per region as a stack.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import mmap
import os
import struct
from collections.abc import Callable
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

# Data slots per region, the unit in which RAM is committed and given back: 1 MiB of pages
# and 12 KiB of slot records (a whole number of 4 KiB pages, so regions punch cleanly), 64
# regions a slab. Smaller means less committed and unused per slab; larger, fewer
# fallocate/madvise calls per page.
REGION_PAGES = 256
assert REGION_PAGES * SLOT_DTYPE.itemsize % PAGE_SIZE == 0
# madvise(MADV_POPULATE_WRITE), Linux 5.14; Python 3.11's mmap module does not name it.
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
# Slots handled at a time while rebuilding the index (3 MiB of records, 256 regions): the
# temporaries stay small enough not to linger in the process's heap afterwards.
REBUILD_CHUNK = 65536
assert REBUILD_CHUNK % REGION_PAGES == 0

SlabKey = tuple[int, int, int]  # (tenant id, volume, slab)
Int32Array = npt.NDArray[np.int32]
# posix_fallocate(fd, offset, length): commits a file range, OSError (ENOSPC) if it cannot.
Allocate = Callable[[int, int, int], None]


class StoreError(Exception):
    """Base of the store's refusals."""


class NoSpaceError(StoreError):
    """The arena (or the tenant table, or the host's memory) is full; nothing of the request
    was stored."""


class _HostFull(Exception):
    """No region could be committed and the committed ones have too few free slots."""

    def __init__(self, cause: OSError | None) -> None:
        super().__init__(cause)
        self.cause = cause


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
        if capacity_pages < 1:
            raise ArenaError("capacity must be at least one page")
        self.path = path
        self.capacity_pages = capacity_pages
        self._allocate = allocate
        slots_offset, data_offset, file_size = arena_layout(capacity_pages)
        self._data_offset = data_offset
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
            os.ftruncate(self._fd, file_size)  # sparse: regions are committed as slabs fill
        try:
            allocate(self._fd, 0, slots_offset)  # the header and tenant table, always
        except OSError as exc:
            os.close(self._fd)
            raise ArenaError(f"cannot allocate {slots_offset} bytes for {path}: {exc}") from None
        # Not MAP_POPULATE: touching a hole of a tmpfs mapping, even to read, commits a page,
        # so pages are mapped region by region as they are committed (_commit).
        self._mmap = mmap.mmap(self._fd, file_size, mmap.MAP_SHARED)
        self._can_populate = True
        self._can_punch = True
        self._populate(0, slots_offset)
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
        # Regions: free slots of region r are _free[r * REGION_PAGES :][: _region_free[r]],
        # a stack with the lowest slot on top; a region is committed (_committed) exactly
        # while it holds a page. A slab fills the regions it owns (_slab_regions, last one
        # first); regions whose owner is gone but which still hold pages of slabs that
        # borrowed a slot there are _orphans, adopted by the next slab that needs room.
        region_count = -(-capacity_pages // REGION_PAGES)
        self._region_slots: Int32Array = np.full(region_count, REGION_PAGES, dtype=np.int32)
        self._region_slots[-1] = capacity_pages - (region_count - 1) * REGION_PAGES
        self._region_free: Int32Array = self._region_slots.copy()
        self._committed: npt.NDArray[np.bool_] = np.zeros(region_count, dtype=np.bool_)
        self._free: Int32Array = np.empty(capacity_pages, dtype=np.int32)
        self._free_total = capacity_pages
        self._slab_regions: dict[SlabKey, list[int]] = {}
        self._region_owner: dict[int, SlabKey] = {}
        self._orphans: set[int] = set()
        try:
            self._rebuild()
        except BaseException:
            self.close()
            raise

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

    def _used_records(self) -> Int32Array:
        """Slots whose record says used, read with pread: unlike a read through the mapping,
        it does not commit the holes it reads (they read as zeros: free)."""
        found: list[Int32Array] = []
        record = SLOT_DTYPE.itemsize
        for start in range(0, self.capacity_pages, REBUILD_CHUNK):
            count = min(REBUILD_CHUNK, self.capacity_pages - start)
            raw = os.pread(self._fd, count * record, SLOTS_OFFSET + start * record)
            states = np.frombuffer(raw, dtype=SLOT_DTYPE)["state"]
            found.append((start + np.flatnonzero(states == SLOT_USED)).astype(np.int32))
        return np.concatenate(found)

    def _rebuild(self) -> None:
        """Rebuild the tenant map, slab index, free stacks and region table from the arena's
        tables; commit the regions holding pages and give every other region back."""
        for tenant_id in range(TENANT_ENTRIES):
            length = int(self._tenant_table[tenant_id, 0])
            if length == 0:
                break
            name = bytes(self._tenant_table[tenant_id, 1 : 1 + length]).decode()
            self._tenant_ids[name] = tenant_id
        candidates = self._used_records()
        holding = np.zeros(self._committed.size, dtype=np.bool_)
        holding[candidates // REGION_PAGES] = True
        # Commit (again) what holds pages before reading it through the mapping: a crash
        # may have cut a commit short, and a page read or written there must not be a hole.
        for first, end in _runs(holding):
            try:
                self._commit(first, end, undo=False)
            except OSError as exc:
                raise ArenaError(f"cannot commit the pages of {self.path}: {exc}") from None
        records = self._slots[candidates]
        # A record whose key is impossible (unknown tenant, page past the slab) is garbage
        # from a kill during allocation: free it.
        valid = (records["tenant"] < len(self._tenant_ids)) & (records["page"] < SLAB_PAGES)
        if not valid.all():
            self._slots["state"][candidates[~valid]] = SLOT_FREE
        used, records = candidates[valid], records[valid]
        used_mask = np.zeros(self.capacity_pages, dtype=np.bool_)
        if used.size:
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
                used_mask[slab_slots[slab_slots >= 0]] = True
                # Two records for one key cannot come from this code, but if a file has them
                # the later slot won above; free the loser so capacity is not lost.
                kept = slab_slots[records["page"][begin:end]]
                losers = used[begin:end][kept != used[begin:end]]
                if losers.size:
                    self._slots["state"][losers] = SLOT_FREE
        self._rebuild_regions(used_mask)

    def _rebuild_regions(self, used_mask: npt.NDArray[np.bool_]) -> None:
        """Free stacks, owners and commitment of every region from the slots in use."""
        for start in range(0, self.capacity_pages, REBUILD_CHUNK):
            free_ids = start + np.flatnonzero(~used_mask[start : start + REBUILD_CHUNK])
            first_region = start // REGION_PAGES
            regions = free_ids // REGION_PAGES - first_region
            region_count = -(-min(REBUILD_CHUNK, self.capacity_pages - start) // REGION_PAGES)
            counts = np.bincount(regions, minlength=region_count)
            # Rank of each free slot within its region, ascending; the lowest goes on top.
            rank = np.arange(free_ids.size) - (np.cumsum(counts) - counts)[regions]
            top = (regions + first_region) * REGION_PAGES + counts[regions] - 1 - rank
            self._free[top] = free_ids
            self._region_free[first_region : first_region + region_count] = counts
        self._free_total = int(self._region_free.sum())
        holding = self._region_free < self._region_slots
        # Give back every region without a page, in runs: an arena of an older version was
        # committed whole, and a crash can leave a commit or a punch half done.
        for first, end in _runs(~holding):
            self._punch(first, end)
        self._committed[:] = holding
        # Each region's owner: the slab of its lowest used slot (a region is one slab's
        # unless the host ran out of memory and other slabs borrowed its free slots).
        used = np.flatnonzero(used_mask)
        if used.size:
            owned, first_index = np.unique(used // REGION_PAGES, return_index=True)
            owners = self._slots[used[first_index]]
            for region, tenant_id, volume, slab in zip(
                owned.tolist(),
                owners["tenant"].tolist(),
                owners["volume"].tolist(),
                owners["slab"].tolist(),
                strict=True,
            ):
                self._own(region, (tenant_id, volume, slab))

    # -- regions ---------------------------------------------------------------------------

    def _span(self, first: int, end: int) -> tuple[int, int, int, int]:
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

    def _commit(self, first: int, end: int, *, undo: bool = True) -> None:
        """Commit host memory for regions first..end-1 and map it.

        Raises:
            OSError: the host cannot (ENOSPC from a full /dev/shm); with `undo` (regions that
                held nothing) whatever part was committed is given back.
        """
        records_start, records_end, data_start, data_end = self._span(first, end)
        try:
            self._allocate(self._fd, records_start, records_end - records_start)
            self._allocate(self._fd, data_start, data_end - data_start)
            # Map the pages in one call now: first writes faulting them in one by one cost
            # more (measured here: commit and write 2.7 us a page this way, 4.1 by faults).
            self._populate(records_start, records_end - records_start)
            self._populate(data_start, data_end - data_start)
        except OSError:
            if undo:
                self._punch(first, end)
            raise
        self._committed[first:end] = True

    def _populate(self, start: int, length: int) -> None:
        if not self._can_populate or not length:
            return
        try:
            self._mmap.madvise(MADV_POPULATE_WRITE, start, length)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self._can_populate = False  # before Linux 5.14: pages fault in on first write

    def _punch(self, first: int, end: int) -> None:
        """Give the memory of regions first..end-1 back to the host (they hold no page)."""
        self._committed[first:end] = False
        if not self._can_punch:
            return
        records_start, records_end, data_start, data_end = self._span(first, end)
        try:
            # On a shared tmpfs mapping MADV_REMOVE is fallocate(PUNCH_HOLE): the pages are
            # freed and read as zeros (free slots) afterwards.
            self._mmap.madvise(mmap.MADV_REMOVE, records_start, records_end - records_start)
            self._mmap.madvise(mmap.MADV_REMOVE, data_start, data_end - data_start)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            self._can_punch = False  # a file system without holes: the memory stays committed

    def _own(self, region: int, key: SlabKey) -> None:
        self._region_owner[region] = key
        self._slab_regions.setdefault(key, []).append(region)

    def _disown(self, key: SlabKey) -> None:
        """`key` holds no page any more: regions it still owns hold other slabs' pages."""
        for region in self._slab_regions.pop(key, ()):
            del self._region_owner[region]
            self._orphans.add(region)

    def _take(self, region: int, count: int) -> Int32Array:
        """`count` free slots of `region` (it has them), lowest first."""
        top = int(self._region_free[region])
        base = region * REGION_PAGES
        taken = self._free[base + top - count : base + top][::-1].copy()
        self._region_free[region] = top - count
        self._free_total -= count
        return taken

    def _take_some(self, region: int, need: int, parts: list[Int32Array]) -> int:
        """Up to `need` free slots of `region` into `parts`; returns how many are still
        needed."""
        count = min(int(self._region_free[region]), need)
        if count:
            parts.append(self._take(region, count))
        return need - count

    def _first_uncommitted(self) -> int:
        """The lowest region holding no memory, or -1: the file stays dense at its start."""
        region = int(np.argmin(self._committed))
        return -1 if self._committed[region] else region

    def _take_for(self, key: SlabKey, count: int) -> Int32Array:
        """`count` free slots for new pages of slab `key`, from its own regions, then an
        orphan, then new regions, and only if the host has no memory for one, from other
        slabs' regions.

        Raises:
            _HostFull: not enough; every slot taken here was given back.
        """
        owned = self._slab_regions.get(key)
        if owned and self._region_free[owned[-1]] >= count:
            return self._take(owned[-1], count)  # nearly every PUT: its slab's open region
        parts: list[Int32Array] = []
        need = count
        for region in owned or ():
            need = self._take_some(region, need, parts)
            if not need:
                break
        for region in sorted(self._orphans) if need else ():
            if self._region_free[region]:
                self._orphans.discard(region)
                self._own(region, key)
                need = self._take_some(region, need, parts)
                if not need:
                    break
        cause: OSError | None = None
        while need and (region := self._first_uncommitted()) >= 0:
            try:
                self._commit(region, region + 1)
            except OSError as exc:
                cause = exc
                break
            self._own(region, key)
            need = self._take_some(region, need, parts)
        if need:
            # The host is out of memory: what is committed still counts as capacity.
            lending = self._committed & (self._region_free > 0)
            for region in np.flatnonzero(lending).tolist():
                need = self._take_some(region, need, parts)
                if not need:
                    break
        if need:
            for part in parts:
                self._return_slots(part)
            raise _HostFull(cause)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _allocate_slots(
        self, tenant_id: int, volume: int, groups: list[tuple[int, npt.NDArray[np.intp]]]
    ) -> Int32Array:
        """Free slots for new pages, in the order of the positions in `groups`; all or none.

        Raises:
            NoSpaceError: the host could not commit the memory; nothing was taken.
        """
        count = sum(positions.size for _, positions in groups)
        if len(groups) == 1:
            try:
                return self._take_for((tenant_id, volume, groups[0][0]), count)
            except _HostFull as exc:
                self._disown_if_empty((tenant_id, volume, groups[0][0]))
                raise self._host_full(exc, count) from None
        fresh = np.empty(count, dtype=np.int32)
        done: list[Int32Array] = []
        for slab, positions in groups:
            key = (tenant_id, volume, slab)
            try:
                taken = self._take_for(key, positions.size)
            except _HostFull as exc:
                for part in done:
                    self._return_slots(part)
                for other, _ in groups:
                    self._disown_if_empty((tenant_id, volume, other))
                raise self._host_full(exc, count) from None
            fresh[positions] = taken
            done.append(taken)
        return fresh

    def _disown_if_empty(self, key: SlabKey) -> None:
        if key not in self._slabs:
            self._disown(key)

    def _host_full(self, exc: _HostFull, count: int) -> NoSpaceError:
        why = exc.cause.strerror if exc.cause is not None else "no region left"
        return NoSpaceError(
            f"{count} new pages do not fit: the host cannot commit more memory for the arena "
            f"({why}) and its committed regions have {self._committed_free()} free slots"
        )

    def _committed_free(self) -> int:
        return int(self._region_free[self._committed].sum())

    def _return_slots(self, slots: Int32Array) -> None:
        """Put freed slots back on their regions' stacks; give back regions left empty."""
        if not slots.size:
            return
        regions = slots // REGION_PAGES
        if (regions == regions[0]).all():
            groups = [(int(regions[0]), slots)]
        else:
            order = np.argsort(regions, kind="stable")
            regions, slots = regions[order], slots[order]
            starts = np.flatnonzero(np.diff(regions)) + 1
            bounds = [0, *starts.tolist(), slots.size]
            groups = [
                (int(regions[begin]), slots[begin:end]) for begin, end in itertools.pairwise(bounds)
            ]
        for region, group in groups:
            base = region * REGION_PAGES
            top = int(self._region_free[region])
            self._free[base + top : base + top + group.size] = group
            top += group.size
            self._region_free[region] = top
            if top == self._region_slots[region]:
                self._release_region(region)
        self._free_total += int(slots.size)

    def _release_region(self, region: int) -> None:
        """`region` holds no page any more: hand its memory back, forget its owner."""
        self._punch(region, region + 1)
        owner = self._region_owner.pop(region, None)
        if owner is None:
            self._orphans.discard(region)
            return
        owned = self._slab_regions[owner]
        owned.remove(region)
        if not owned:
            del self._slab_regions[owner]

    # -- accounting ------------------------------------------------------------------------

    @property
    def used_pages(self) -> int:
        return self.capacity_pages - self._free_total

    @property
    def free_pages(self) -> int:
        return self._free_total

    @property
    def committed_bytes(self) -> int:
        """Host memory the arena file holds now (its allocated blocks)."""
        return os.fstat(self._fd).st_blocks * 512

    @property
    def committed_regions(self) -> int:
        return int(np.count_nonzero(self._committed))

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
        if new_count > self._free_total:
            raise NoSpaceError(
                f"{new_count} new pages do not fit: {self._free_total} of "
                f"{self.capacity_pages} pages free"
            )
        skipped = 0
        if not overwrite:
            skipped = keys.shape[0] - new_count
            keys, crcs, pages = keys[missing], crcs[missing], pages[missing]
            seals = seals[missing]
            slots, missing = slots[missing], np.ones(new_count, dtype=np.bool_)
        if new_count:
            new_keys = keys[missing]
            groups = self._slab_groups(new_keys["slab"])
            fresh = self._allocate_slots(tenant_id, volume, groups)
            slots[missing] = fresh
            # Key fields before the state flag: a slot is only "used" once it says whose.
            self._slots["tenant"][fresh] = tenant_id
            self._slots["volume"][fresh] = volume
            self._slots["slab"][fresh] = new_keys["slab"]
            self._slots["page"][fresh] = new_keys["page"]
        # Data and seal before checksum: a kill in between leaves a mismatch the reader
        # detects.
        self._data[slots] = pages
        self._slots["seal"][slots] = seals
        self._slots["crc"][slots] = crcs
        if new_count:
            self._slots["state"][fresh] = SLOT_USED
            for slab, positions in groups:
                key = (tenant_id, volume, slab)
                slab_slots = self._slabs.get(key)
                if slab_slots is None:
                    slab_slots = np.full(SLAB_PAGES, -1, dtype=np.int32)
                    self._slabs[key] = slab_slots
                    self._slab_counts[key] = 0
                slab_slots[new_keys["page"][positions]] = fresh[positions]
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
        self._return_slots(slots)
        remaining = self._slab_counts[key] - slots.size
        if remaining:
            self._slab_counts[key] = remaining
        else:
            del self._slabs[key], self._slab_counts[key]
            self._disown(key)

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
        """Flush and unmap the arena (the file stays for the next start; a hole in it reads
        as free slots)."""
        # Drop numpy views before closing the mmap they point into.
        del self._slots, self._crc, self._seal, self._data, self._tenant_table
        self._mmap.flush()
        self._mmap.close()
        os.close(self._fd)


def _runs(mask: npt.NDArray[np.bool_]) -> list[tuple[int, int]]:
    """(first, end) of every run of True in `mask`."""
    edges = np.flatnonzero(np.diff(np.concatenate(([False], mask, [False])).astype(np.int8)))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))

"""The arena's slot allocator: which data slots are free, which regions hold memory, and which
slab fills which region.

Slots are grouped in regions of REGION_PAGES (1 MiB of pages and their records). A region's
memory is committed when a slab first needs it and handed back to the host (a punched hole)
as soon as its last page is freed: a donor lends the RAM its pages use, not its whole
--capacity. A slab fills regions of its own, so dropping it (placement moved it away)
empties whole regions. When the host cannot commit a region (a full /dev/shm), new pages
take free slots of other slabs' regions and, failing that, are refused with NoSpaceError
with nothing taken; the store never writes into a hole, so a full host is never a SIGBUS.
At start every region without a page is given back: an arena of an older version (same
format, allocated whole) opens as it is.

Depends on the arena (arena.py) for the memory itself. Knows slabs only as keys that own
regions; which pages a slab holds is the slab index's (index.py). In RAM: the free slots,
4 bytes per slot (0.1%), kept per region as a stack.
"""

from __future__ import annotations

import itertools

import numpy as np
import numpy.typing as npt

from remem_pageserver import arena as arena_file
from remem_pageserver.arena import (
    REGION_PAGES,
    Arena,
    Int32Array,
    NoSpaceError,
    SlabKey,
    region_count,
    runs,
)


class _HostFull(Exception):
    """No region could be committed and the committed ones have too few free slots."""

    def __init__(self, cause: OSError | None) -> None:
        super().__init__(cause)
        self.cause = cause


class RegionAllocator:
    """Free slots, commitment and owners of the regions of one arena."""

    def __init__(self, arena: Arena, used: npt.NDArray[np.bool_]) -> None:
        """Take over the regions of `arena`, whose slots in use are `used` (a mask over all
        slots): build the free stacks, keep exactly the regions holding pages committed and
        give every other one back, and find each region's owner."""
        self._arena = arena
        capacity_pages = arena.capacity_pages
        regions = region_count(capacity_pages)
        # Free slots of region r are _free[r * REGION_PAGES :][: _region_free[r]], a stack
        # with the lowest slot on top; a region is committed (_committed) exactly while it
        # holds a page. A slab fills the regions it owns (_slab_regions, last one first);
        # regions whose owner is gone but which still hold pages of slabs that borrowed a
        # slot there are _orphans, adopted by the next slab that needs room.
        self._region_slots: Int32Array = np.full(regions, REGION_PAGES, dtype=np.int32)
        self._region_slots[-1] = capacity_pages - (regions - 1) * REGION_PAGES
        self._region_free: Int32Array = self._region_slots.copy()
        self._committed: npt.NDArray[np.bool_] = np.zeros(regions, dtype=np.bool_)
        self._free: Int32Array = np.empty(capacity_pages, dtype=np.int32)
        self._free_total = capacity_pages
        self._slab_regions: dict[SlabKey, list[int]] = {}
        self._region_owner: dict[int, SlabKey] = {}
        self._orphans: set[int] = set()
        self._rebuild(used)

    def _rebuild(self, used_mask: npt.NDArray[np.bool_]) -> None:
        capacity_pages = self._arena.capacity_pages
        chunk = arena_file.REBUILD_CHUNK  # at call time: tests shrink it
        for start in range(0, capacity_pages, chunk):
            free_ids = start + np.flatnonzero(~used_mask[start : start + chunk])
            first_region = start // REGION_PAGES
            regions = free_ids // REGION_PAGES - first_region
            chunk_regions = region_count(min(chunk, capacity_pages - start))
            counts = np.bincount(regions, minlength=chunk_regions)
            # Rank of each free slot within its region, ascending; the lowest goes on top.
            rank = np.arange(free_ids.size) - (np.cumsum(counts) - counts)[regions]
            top = (regions + first_region) * REGION_PAGES + counts[regions] - 1 - rank
            self._free[top] = free_ids
            self._region_free[first_region : first_region + chunk_regions] = counts
        self._free_total = int(self._region_free.sum())
        holding = self._region_free < self._region_slots
        # Give back every region without a page, in runs: an arena of an older version was
        # committed whole, and a crash can leave a commit or a punch half done.
        for first, end in runs(~holding):
            self._punch(first, end)
        self._committed[:] = holding
        # Each region's owner: the slab of its lowest used slot (a region is one slab's
        # unless the host ran out of memory and other slabs borrowed its free slots).
        used = np.flatnonzero(used_mask)
        if used.size:
            owned, first_index = np.unique(used // REGION_PAGES, return_index=True)
            owners = self._arena.slots[used[first_index]]
            for region, tenant_id, volume, slab in zip(
                owned.tolist(),
                owners["tenant"].tolist(),
                owners["volume"].tolist(),
                owners["slab"].tolist(),
                strict=True,
            ):
                self._own(region, (tenant_id, volume, slab))

    # -- accounting ------------------------------------------------------------------------

    @property
    def free_slots(self) -> int:
        return self._free_total

    @property
    def committed_regions(self) -> int:
        return int(np.count_nonzero(self._committed))

    # -- taking slots ----------------------------------------------------------------------

    def allocate(
        self, tenant_id: int, volume: int, groups: list[tuple[int, npt.NDArray[np.intp]]]
    ) -> Int32Array:
        """Free slots for new pages, in the order of the positions in `groups` ((slab,
        positions in the batch) for each slab); all or none.

        Raises:
            NoSpaceError: the host could not commit the memory; no slot was taken. A slab of
                the batch may have adopted an orphan region meanwhile: the caller disowns
                the slabs that hold no page (disown).
        """
        count = sum(positions.size for _, positions in groups)
        if len(groups) == 1:
            try:
                return self._take_for((tenant_id, volume, groups[0][0]), count)
            except _HostFull as exc:
                raise self._host_full(exc, count) from None
        fresh = np.empty(count, dtype=np.int32)
        done: list[Int32Array] = []
        for slab, positions in groups:
            try:
                taken = self._take_for((tenant_id, volume, slab), positions.size)
            except _HostFull as exc:
                for part in done:
                    self.release(part)
                raise self._host_full(exc, count) from None
            fresh[positions] = taken
            done.append(taken)
        return fresh

    def _host_full(self, exc: _HostFull, count: int) -> NoSpaceError:
        why = exc.cause.strerror if exc.cause is not None else "no region left"
        committed_free = int(self._region_free[self._committed].sum())
        return NoSpaceError(
            f"{count} new pages do not fit: the host cannot commit more memory for the arena "
            f"({why}) and its committed regions have {committed_free} free slots"
        )

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
                self._commit(region)
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
                self.release(part)
            raise _HostFull(cause)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

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

    # -- giving slots back -----------------------------------------------------------------

    def release(self, slots: Int32Array) -> None:
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

    # -- owners and memory -----------------------------------------------------------------

    def _own(self, region: int, key: SlabKey) -> None:
        self._region_owner[region] = key
        self._slab_regions.setdefault(key, []).append(region)

    def disown(self, key: SlabKey) -> None:
        """`key` holds no page any more: regions it still owns hold other slabs' pages."""
        for region in self._slab_regions.pop(key, ()):
            del self._region_owner[region]
            self._orphans.add(region)

    def _commit(self, region: int) -> None:
        """Commit `region`, which holds nothing.

        Raises:
            OSError: the host cannot; whatever part was committed is given back.
        """
        try:
            self._arena.commit(region, region + 1)
        except OSError:
            self._punch(region, region + 1)
            raise
        self._committed[region] = True

    def _punch(self, first: int, end: int) -> None:
        """Give back the memory of regions first..end-1 (they hold no page)."""
        self._committed[first:end] = False
        self._arena.punch(first, end)

"""The slab index: which data slot holds each page of each (tenant, volume, slab), and the
tenant table that numbers tenants.

The index lives in RAM, rebuilt at start from the arena's slot records; the tenant table is
in the arena (arena.py), written here when a tenant first stores a page. Per held slab one
int32 array of SLAB_PAGES slot numbers (-1 = not held), i.e. 64 KiB per 64 MiB slab (0.1%).
Knows nothing of free slots or memory (the region allocator's, regions.py): it is told which
slots new pages went to, and says which slots freed pages leave.
"""

from __future__ import annotations

import itertools
import struct

import numpy as np
import numpy.typing as npt
from remem_common.protocol.pages import SLAB_PAGES, KeyArray

from remem_pageserver.arena import (
    SLOT_FREE,
    TENANT_ENTRIES,
    TENANT_ENTRY_BYTES,
    Arena,
    Int32Array,
    NoSpaceError,
    SlabKey,
)

# Batches of at most this many keys are looked up in plain Python (see SlabIndex.lookup).
SMALL_LOOKUP = 16
_KEY = struct.Struct("<II")  # KEY_DTYPE: slab, page

SlabGroups = list[tuple[int, npt.NDArray[np.intp]]]


def slab_groups(slabs: npt.NDArray[np.uint32]) -> SlabGroups:
    """(slab, positions in the batch) for each slab a batch touches."""
    if slabs.size and (slabs == slabs[0]).all():
        return [(int(slabs[0]), np.arange(slabs.size))]
    order = np.argsort(slabs, kind="stable")
    sorted_slabs = slabs[order]
    starts = np.flatnonzero(np.diff(sorted_slabs)) + 1
    bounds = [0, *starts.tolist(), slabs.size]
    return [
        (int(sorted_slabs[begin]), order[begin:end]) for begin, end in itertools.pairwise(bounds)
    ]


class SlabIndex:
    """Tenants by name and slots by (tenant id, volume, slab, page), for one arena."""

    def __init__(self, arena: Arena) -> None:
        """An empty index of `arena`; rebuild() fills it from the arena's tables."""
        self._arena = arena
        self._tenant_ids: dict[str, int] = {}
        self._slabs: dict[SlabKey, Int32Array] = {}
        self._slab_counts: dict[SlabKey, int] = {}

    def rebuild(self, candidates: Int32Array) -> npt.NDArray[np.bool_]:
        """Load the tenant table and index the slots in `candidates` (those whose record says
        used, their memory committed); free records that cannot be right.

        Returns:
            The slots in use, a mask over all slots.
        """
        tenant_table = self._arena.tenant_table
        for tenant_id in range(TENANT_ENTRIES):
            length = int(tenant_table[tenant_id, 0])
            if length == 0:
                break
            name = bytes(tenant_table[tenant_id, 1 : 1 + length]).decode()
            self._tenant_ids[name] = tenant_id
        slots = self._arena.slots
        records = slots[candidates]
        # A record whose key is impossible (unknown tenant, page past the slab) is garbage
        # from a kill during allocation: free it.
        valid = (records["tenant"] < len(self._tenant_ids)) & (records["page"] < SLAB_PAGES)
        if not valid.all():
            slots["state"][candidates[~valid]] = SLOT_FREE
        used, records = candidates[valid], records[valid]
        used_mask = np.zeros(self._arena.capacity_pages, dtype=np.bool_)
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
                    slots["state"][losers] = SLOT_FREE
        return used_mask

    # -- tenants ---------------------------------------------------------------------------

    def tenant_id(self, tenant: str, *, create: bool) -> int | None:
        """The arena's id of `tenant`; registered in the tenant table when `create`.

        Raises:
            NoSpaceError: the table is full, or the name does not fit an entry.
        """
        tenant_id = self._tenant_ids.get(tenant)
        if tenant_id is not None or not create:
            return tenant_id
        tenant_id = len(self._tenant_ids)
        encoded = tenant.encode()
        if tenant_id >= TENANT_ENTRIES:
            raise NoSpaceError(f"tenant table full ({TENANT_ENTRIES} tenants)")
        if len(encoded) >= TENANT_ENTRY_BYTES:
            raise NoSpaceError("tenant name too long for the arena")
        row = self._arena.tenant_table[tenant_id]
        row[1 : 1 + len(encoded)] = np.frombuffer(encoded, dtype=np.uint8)
        row[0] = len(encoded)  # length last: the entry exists only once complete
        self._tenant_ids[tenant] = tenant_id
        return tenant_id

    def tenant_name(self, tenant_id: int) -> str:
        for name, known in self._tenant_ids.items():
            if known == tenant_id:
                return name
        raise KeyError(tenant_id)

    # -- pages -----------------------------------------------------------------------------

    def lookup(self, tenant_id: int, volume: int, keys: KeyArray) -> Int32Array:
        """The slot of each key, -1 where not held."""
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
        groups = slab_groups(keys["slab"])
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

    def lookup_words(self, tenant_id: int, volume: int, keys: tuple[int, ...]) -> list[int]:
        """`lookup` of a small batch given as key words (slab, page, slab, page, ...)."""
        slabs = self._slabs
        last_slab, slab_slots = -1, None
        slots: list[int] = []
        for at in range(0, len(keys), 2):
            slab = keys[at]
            if slab != last_slab:
                last_slab, slab_slots = slab, slabs.get((tenant_id, volume, slab))
            slots.append(-1 if slab_slots is None else slab_slots.item(keys[at + 1]))
        return slots

    def insert(
        self,
        tenant_id: int,
        volume: int,
        groups: SlabGroups,
        pages: npt.NDArray[np.uint32],
        slots: Int32Array,
    ) -> None:
        """Index new pages: page pages[i] of slab groups[..][0] is in slot slots[i], for the
        positions i of each group; none of them is held yet."""
        for slab, positions in groups:
            key = (tenant_id, volume, slab)
            slab_slots = self._slabs.get(key)
            if slab_slots is None:
                slab_slots = np.full(SLAB_PAGES, -1, dtype=np.int32)
                self._slabs[key] = slab_slots
                self._slab_counts[key] = 0
            slab_slots[pages[positions]] = slots[positions]
            self._slab_counts[key] += positions.size

    def remove(
        self, tenant_id: int, volume: int, keys: KeyArray
    ) -> list[tuple[SlabKey, Int32Array, bool]]:
        """Unindex the pages of `keys` that are held.

        Returns:
            For each slab that held some: its key, the slots its pages leave, and whether
            the slab now holds no page (it is gone from the index).
        """
        removed: list[tuple[SlabKey, Int32Array, bool]] = []
        pages = keys["page"]
        for slab, positions in slab_groups(keys["slab"]):
            key = (tenant_id, volume, slab)
            slab_slots = self._slabs.get(key)
            if slab_slots is None:
                continue
            slab_pages = pages[positions]
            slots = slab_slots[slab_pages]
            held = slots >= 0
            freed = slots[held]
            if not freed.size:
                continue
            slab_slots[slab_pages[held]] = -1
            removed.append((key, freed, self._forget(key, freed.size)))
        return removed

    def drop(self, key: SlabKey) -> Int32Array | None:
        """Unindex every page of slab `key`; returns the slots they leave (None: not held)."""
        slab_slots = self._slabs.get(key)
        if slab_slots is None:
            return None
        held = slab_slots[slab_slots >= 0]
        self._forget(key, held.size)
        return held

    def _forget(self, key: SlabKey, count: int) -> bool:
        """`count` pages of `key` are gone; True if it holds none any more (and is gone)."""
        remaining = self._slab_counts[key] - count
        if remaining:
            self._slab_counts[key] = remaining
            return False
        del self._slabs[key], self._slab_counts[key]
        return True

    # -- slabs -----------------------------------------------------------------------------

    def holds(self, key: SlabKey) -> bool:
        """Whether slab `key` holds a page."""
        return key in self._slabs

    @property
    def slab_count(self) -> int:
        return len(self._slabs)

    def inventory(self) -> list[tuple[str, int, int, int]]:
        """(tenant, volume, slab, pages held) for every slab held, sorted."""
        names = {tenant_id: name for name, tenant_id in self._tenant_ids.items()}
        return sorted(
            (names[tenant_id], volume, slab, count)
            for (tenant_id, volume, slab), count in self._slab_counts.items()
        )

    def slab_pages(self, key: SlabKey) -> npt.NDArray[np.uint32]:
        """Page indices held of slab `key`, ascending."""
        slab_slots = self._slabs.get(key)
        if slab_slots is None:
            return np.empty(0, dtype=np.uint32)
        return np.flatnonzero(slab_slots >= 0).astype(np.uint32)

"""The page store's memory: an arena commits RAM region by region as slabs fill, hands a
region back when its last page goes (drop, push away, trim), and a host that cannot commit
more is answered "no space" with nothing stored, never a SIGBUS."""

from __future__ import annotations

import errno
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from remem_common.protocol.pages import PAGE_SIZE, SLAB_PAGES, checksum_pages, make_keys
from remem_pageserver import arena as arena_module
from remem_pageserver.store import (
    REGION_PAGES,
    SLOT_DTYPE,
    SLOTS_OFFSET,
    NoSpaceError,
    PageStore,
)

from .test_store import put, random_pages, seals_of

HEADER_BYTES = SLOTS_OFFSET  # header and tenant table: committed whenever the arena is open
REGION_BYTES = REGION_PAGES * (PAGE_SIZE + SLOT_DTYPE.itemsize)
MiB = 1 << 20


def allocated(path: Path) -> int:
    """Bytes of memory the file holds: its allocated blocks, not its apparent size."""
    return path.stat().st_blocks * 512


@pytest.fixture
def arena(shm_dir: Path) -> Path:
    return shm_dir / "regions.arena"


class FailingAllocate:
    """posix_fallocate until `fail` is set, then ENOSPC as from a full /dev/shm."""

    def __init__(self) -> None:
        self.fail = False
        self.calls = 0

    def __call__(self, fd: int, offset: int, length: int) -> None:
        self.calls += 1
        if self.fail:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        os.posix_fallocate(fd, offset, length)


def fill(store: PageStore, slab: int, count: int, seed: int = 0, tenant: str = "t") -> np.ndarray:
    data = random_pages(count, seed)
    for start in range(0, count, 64):
        part = data[start : start + 64]
        put(store, tenant, [slab] * part.shape[0], list(range(start, start + part.shape[0])), part)
    return data


def check_regions(store: PageStore, path: Path) -> None:
    """A region is committed exactly while it holds a page, and the file holds exactly the
    header and the committed regions."""
    regions = store._regions
    held = regions._region_slots - regions._region_free
    assert np.array_equal(regions._committed, held > 0)
    expected = HEADER_BYTES
    for region in np.flatnonzero(regions._committed).tolist():
        records_start, records_end, data_start, data_end = store._arena.span(region, region + 1)
        expected += records_end - records_start + data_end - data_start
    assert allocated(path) == expected == store.committed_bytes
    assert store.used_pages == int(held.sum())


def test_a_new_arena_commits_only_its_header(arena: Path) -> None:
    store = PageStore(arena, (1 << 30) // PAGE_SIZE)
    assert arena.stat().st_size > 1 << 30
    assert allocated(arena) == HEADER_BYTES
    store.close()


def test_ram_is_committed_as_a_slab_fills(arena: Path) -> None:
    store = PageStore(arena, 8 * REGION_PAGES)
    fill(store, 0, REGION_PAGES + 1)
    assert store.committed_regions == 2
    assert allocated(arena) == HEADER_BYTES + 2 * REGION_BYTES
    check_regions(store, arena)
    store.close()


def test_dropping_a_slab_gives_its_regions_back(arena: Path) -> None:
    """Two slabs written interleaved, as a client's writes arrive: each fills regions of its
    own, so dropping one (placement's order after pushing it away) frees whole regions."""
    store = PageStore(arena, 16 * REGION_PAGES)
    kept = random_pages(3 * REGION_PAGES, 1)
    for start in range(0, 3 * REGION_PAGES, 64):
        idx = list(range(start, start + 64))
        put(store, "t", [1] * 64, idx, random_pages(64, start))
        put(store, "t", [2] * 64, idx, kept[start : start + 64])
    before = allocated(arena)
    assert before == HEADER_BYTES + 6 * REGION_BYTES
    assert store.drop_slab("t", 0, 1) == 3 * REGION_PAGES
    assert allocated(arena) == before - 3 * REGION_BYTES
    check_regions(store, arena)
    result = store.get("t", 0, make_keys([2] * kept.shape[0], list(range(kept.shape[0]))))
    assert result.found.all() and np.array_equal(result.data, kept)
    assert store.drop_slab("t", 0, 2) == 3 * REGION_PAGES
    assert allocated(arena) == HEADER_BYTES
    store.close()


def test_trimming_a_whole_region_gives_it_back(arena: Path) -> None:
    store = PageStore(arena, 4 * REGION_PAGES)
    fill(store, 0, 2 * REGION_PAGES)
    assert store.delete("t", 0, make_keys([0] * 10, list(range(10)))) == 10
    assert store.committed_regions == 2  # a region with pages left stays
    second = list(range(REGION_PAGES, 2 * REGION_PAGES))
    assert store.delete("t", 0, make_keys([0] * REGION_PAGES, second)) == REGION_PAGES
    assert store.committed_regions == 1
    check_regions(store, arena)
    # Trimmed slots are reused by the slab before any new region is committed.
    put(store, "t", [0] * 10, list(range(5000, 5010)), random_pages(10, 3))
    assert store.committed_regions == 1 and store.free_pages == 3 * REGION_PAGES
    check_regions(store, arena)
    store.close()


def test_restart_over_a_sparse_arena(arena: Path) -> None:
    store = PageStore(arena, 8 * REGION_PAGES)
    data = {slab: fill(store, slab, 300, seed=slab) for slab in (0, 3, 5)}
    store.drop_slab("t", 0, 3)
    inventory = store.inventory()
    committed = allocated(arena)
    store.close()
    reopened = PageStore(arena, 8 * REGION_PAGES)
    assert reopened.inventory() == inventory
    assert allocated(arena) == committed
    check_regions(reopened, arena)
    for slab in (0, 5):
        result = reopened.get("t", 0, make_keys([slab] * 300, list(range(300))))
        assert result.found.all() and np.array_equal(result.data, data[slab])
    # The slabs keep filling their own regions after the restart.
    put(reopened, "t", [0], [300], random_pages(1, 9))
    assert reopened.committed_regions == 4
    assert reopened.drop_slab("t", 0, 0) == 301
    check_regions(reopened, arena)
    reopened.close()


def test_an_arena_committed_whole_gives_back_its_free_regions(arena: Path) -> None:
    """Arenas of earlier versions were allocated whole at start; the same format opens as
    it is and returns what holds no page."""
    store = PageStore(arena, 8 * REGION_PAGES)
    data = fill(store, 2, 100)
    store.close()
    fd = os.open(arena, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, arena.stat().st_size)
    finally:
        os.close(fd)
    assert allocated(arena) == arena.stat().st_size
    reopened = PageStore(arena, 8 * REGION_PAGES)
    assert allocated(arena) == HEADER_BYTES + REGION_BYTES
    result = reopened.get("t", 0, make_keys([2] * 100, list(range(100))))
    assert np.array_equal(result.data, data)
    reopened.close()


def test_a_host_out_of_memory_is_no_space_with_nothing_stored(arena: Path) -> None:
    allocate = FailingAllocate()
    store = PageStore(arena, 8 * REGION_PAGES, allocate=allocate)
    first = fill(store, 0, 100)
    allocate.fail = True
    committed = allocated(arena)
    # New pages of a slab in its own committed region still go in: no memory needed.
    put(store, "t", [0], [100], random_pages(1, 2))
    # A batch needing a new region borrows the free slots committed for other slabs ...
    put(store, "t", [1] * 150, list(range(150)), random_pages(150, 3))
    assert store.committed_regions == 1 and allocated(arena) == committed
    # ... and once those are used up, the next is refused whole: all or nothing.
    calls = allocate.calls
    with pytest.raises(NoSpaceError, match="cannot commit more memory"):
        put(store, "t", [1] * 5 + [4] * 5, [150 + i for i in range(5)] * 2, random_pages(10, 4))
    assert allocate.calls > calls
    assert store.used_pages == 251 and allocated(arena) == committed
    refused = make_keys([1] * 5 + [4] * 5, [150 + i for i in range(5)] * 2)
    assert not store.get("t", 0, refused).found.any()
    assert store.inventory() == [("t", 0, 0, 101), ("t", 0, 1, 150)]
    check_regions(store, arena)
    # Overwrites need no memory and still work; once the host has memory again, so do PUTs.
    put(store, "t", [0] * 100, list(range(100)), random_pages(100, 5))
    allocate.fail = False
    put(store, "t", [4] * 5, list(range(5)), random_pages(5, 6))
    assert store.committed_regions == 2
    check_regions(store, arena)
    store.close()
    reopened = PageStore(arena, 8 * REGION_PAGES)
    assert reopened.used_pages == 256
    assert not np.array_equal(reopened.get("t", 0, make_keys([0], [0])).data[0], first[0])
    check_regions(reopened, arena)
    reopened.close()


def test_a_failed_commit_of_a_later_slab_undoes_the_whole_batch(arena: Path) -> None:
    allocate = FailingAllocate()
    store = PageStore(arena, 4 * REGION_PAGES, allocate=allocate)

    def fail_on_second_region(fd: int, offset: int, length: int) -> None:
        allocate(fd, offset, length)
        if allocate.calls >= 4:  # from the data of the second new region on
            allocate.fail = True

    store._arena._allocate = fail_on_second_region
    # Slab 7 fills its new region whole, so slab 8 finds no slot to borrow either.
    pages_idx = [*range(REGION_PAGES), 0, 1, 2]
    with pytest.raises(NoSpaceError):
        put(store, "t", [7] * REGION_PAGES + [8] * 3, pages_idx, random_pages(REGION_PAGES + 3))
    assert store.used_pages == 0 and store.inventory() == []
    assert allocated(arena) == HEADER_BYTES
    regions = store._regions
    assert not regions._slab_regions and not regions._region_owner and not regions._orphans
    check_regions(store, arena)
    store.close()


def test_slots_borrowed_from_a_dropped_slab_keep_its_region(arena: Path) -> None:
    """Slab 1 borrows slots in slab 0's region while the host is full; dropping slab 0 keeps
    the region (slab 1's pages are there) until the last of them goes, then gives it back."""
    allocate = FailingAllocate()
    store = PageStore(arena, 4 * REGION_PAGES, allocate=allocate)
    fill(store, 0, 100)
    allocate.fail = True
    borrowed = random_pages(20, 1)
    put(store, "t", [1] * 20, list(range(20)), borrowed)
    allocate.fail = False
    store.drop_slab("t", 0, 0)
    assert store.committed_regions == 1 and store._regions._orphans == {0}
    assert np.array_equal(store.get("t", 0, make_keys([1] * 20, list(range(20)))).data, borrowed)
    put(store, "t", [2] * 10, list(range(10)), random_pages(10, 2))  # adopts the orphan
    assert store.committed_regions == 1 and store._regions._slab_regions == {(0, 0, 2): [0]}
    store.drop_slab("t", 0, 1)
    store.drop_slab("t", 0, 2)
    assert allocated(arena) == HEADER_BYTES
    check_regions(store, arena)
    store.close()


@pytest.mark.parametrize("rebuild_chunk", [arena_module.REBUILD_CHUNK, 2 * REGION_PAGES])
def test_regions_follow_a_random_workload_and_restarts(
    arena: Path, rebuild_chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Puts, trims and drops over many slabs, the host sometimes full, with restarts (their
    rebuild also in small chunks): the store answers as a dict would, and commits exactly
    the regions that hold pages."""
    monkeypatch.setattr(arena_module, "REBUILD_CHUNK", rebuild_chunk)
    capacity = 6 * REGION_PAGES + 37  # a short last region too
    allocate = FailingAllocate()
    store = PageStore(arena, capacity, allocate=allocate)
    rng = np.random.default_rng(11)
    model: dict[tuple[int, int], int] = {}
    for step in range(300):
        allocate.fail = rng.random() < 0.15
        action = rng.random()
        slab = int(rng.integers(0, 6))
        if action < 0.6:
            pages_idx = np.unique(rng.integers(0, 2 * REGION_PAGES, int(rng.integers(1, 200))))
            slabs = rng.integers(slab, slab + 2, pages_idx.size)
            data = random_pages(pages_idx.size, step)
            new = sum((int(s), int(p)) not in model for s, p in zip(slabs, pages_idx, strict=True))
            try:
                put(store, "t", slabs.tolist(), pages_idx.tolist(), data)
            except NoSpaceError:
                assert allocate.fail or new > capacity - len(model)
            else:
                crcs = checksum_pages(data)
                for index, key in enumerate(zip(slabs.tolist(), pages_idx.tolist(), strict=True)):
                    model[key] = int(crcs[index])
        elif action < 0.85:
            pages_idx = np.unique(rng.integers(0, 2 * REGION_PAGES, int(rng.integers(1, 300))))
            store.delete("t", 0, make_keys([slab] * pages_idx.size, pages_idx.tolist()))
            for page in pages_idx.tolist():
                model.pop((slab, page), None)
        elif action < 0.95:
            store.drop_slab("t", 0, slab)
            model = {key: crc for key, crc in model.items() if key[0] != slab}
        else:
            store.close()
            allocate.fail = False
            store = PageStore(arena, capacity, allocate=allocate)
        check_regions(store, arena)
        assert store.used_pages == len(model)
    keys = sorted(model)
    result = store.get("t", 0, make_keys([s for s, _ in keys], [p for _, p in keys]))
    assert result.found.all()
    assert result.crcs.tolist() == [model[key] for key in keys]
    assert np.array_equal(checksum_pages(result.data), result.crcs)
    store.close()


@pytest.fixture
def small_tmpfs() -> Iterator[Path]:
    """A 4 MiB tmpfs: a host whose /dev/shm fills up, for real."""
    if os.geteuid() != 0:
        pytest.skip("needs root: mount -t tmpfs")
    mount_point = Path("/tmp") / f"remem-small-tmpfs-{uuid.uuid4().hex[:12]}"
    mount_point.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)], check=True
        )
        try:
            yield mount_point
        finally:
            subprocess.run(["umount", str(mount_point)], check=True)
    finally:
        mount_point.rmdir()


@pytest.mark.root
def test_a_full_tmpfs_is_no_space_not_sigbus(small_tmpfs: Path) -> None:
    """An arena of 64 MiB on a 4 MiB tmpfs: PUTs go in until the tmpfs is full, then are
    refused whole; every page stored reads back. (A SIGBUS would kill the test run.)"""
    path = small_tmpfs / "full.arena"
    store = PageStore(path, 64 * MiB // PAGE_SIZE)
    stored: dict[int, np.ndarray] = {}
    refused = 0
    for slab in range(40):
        data = random_pages(64, slab)
        try:
            put(store, "t", [slab] * 64, list(range(64)), data)
        except NoSpaceError as exc:
            assert "No space left on device" in str(exc)
            refused += 1
            assert not store.get("t", 0, make_keys([slab] * 64, list(range(64)))).found.any()
        else:
            stored[slab] = data
    assert refused and len(stored) >= 2
    assert store.used_pages == 64 * len(stored)
    for slab, data in stored.items():
        result = store.get("t", 0, make_keys([slab] * 64, list(range(64))))
        assert np.array_equal(result.data, data)
        assert np.array_equal(result.seals, seals_of(data))
    store.close()
    path.unlink()


def test_slab_pages_constant_is_a_whole_number_of_regions() -> None:
    assert SLAB_PAGES % REGION_PAGES == 0

"""The page store on a real arena file: contents, capacity, restart, tenants, slabs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from remem_common.protocol.pages import (
    PAGE_SIZE,
    SEAL_BYTES,
    SLAB_PAGES,
    checksum_pages,
    make_keys,
)
from remem_pageserver.store import (
    HEADER,
    MAGIC,
    SLOT_USED,
    ArenaError,
    NoSpaceError,
    PageStore,
    arena_layout,
)


def random_pages(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, PAGE_SIZE), dtype=np.uint8)


@pytest.fixture
def arena(shm_dir: Path) -> Path:
    return shm_dir / "unit.arena"


def seals_of(data: np.ndarray) -> np.ndarray:
    """Stand-ins for a client's nonce and tag: distinct per page, opaque to the store."""
    return np.ascontiguousarray(data[:, -SEAL_BYTES:])


def put(
    store: PageStore,
    tenant: str,
    slabs: list[int],
    pages_idx: list[int],
    data: np.ndarray,
    volume: int = 0,
    overwrite: bool = True,
) -> tuple[int, int]:
    return store.put(
        tenant,
        volume,
        make_keys(slabs, pages_idx),
        checksum_pages(data),
        data,
        seals_of(data),
        overwrite=overwrite,
    )


def test_put_get_delete_across_slabs(arena: Path) -> None:
    store = PageStore(arena, 64)
    data = random_pages(6)
    assert put(store, "t", [0, 0, 5, 5, 9, 0], [1, 2, 1, SLAB_PAGES - 1, 0, 3], data) == (6, 0)
    keys = make_keys([5, 0, 9, 7], [SLAB_PAGES - 1, 2, 0, 0])
    result = store.get("t", 0, keys)
    assert result.found.tolist() == [True, True, True, False]
    assert np.array_equal(result.data[:3], data[[3, 1, 4]])
    assert not result.data[3].any() and result.crcs[3] == 0
    assert np.array_equal(result.crcs[:3], checksum_pages(data[[3, 1, 4]]))
    assert np.array_equal(result.seals[:3], seals_of(data[[3, 1, 4]]))
    assert not result.seals[3].any()
    assert store.used_pages == 6 and store.slab_count == 3
    assert store.delete("t", 0, make_keys([0, 0, 7], [1, 2, 0])) == 2
    assert store.inventory() == [("t", 0, 0, 1), ("t", 0, 5, 2), ("t", 0, 9, 1)]
    assert store.used_pages == 4
    store.close()


def test_overwrite_replaces_in_place(arena: Path) -> None:
    store = PageStore(arena, 4)
    put(store, "t", [0], [0], random_pages(1, 1))
    newer = random_pages(1, 2)
    put(store, "t", [0], [0], newer)
    assert store.used_pages == 1
    assert np.array_equal(store.get("t", 0, make_keys([0], [0])).data, newer)
    store.close()


def test_full_means_full_and_nothing_is_evicted(arena: Path) -> None:
    store = PageStore(arena, 4)
    first = random_pages(3, 1)
    put(store, "t", [0, 0, 0], [0, 1, 2], first)
    with pytest.raises(NoSpaceError):
        put(store, "t", [0, 0], [3, 4], random_pages(2, 2))
    assert store.used_pages == 3
    assert not store.get("t", 0, make_keys([0, 0], [3, 4])).found.any()
    assert np.array_equal(store.get("t", 0, make_keys([0, 0, 0], [0, 1, 2])).data, first)
    # Overwriting held pages needs no new space, so it still works when full.
    put(store, "t", [0], [3], random_pages(1, 3))
    put(store, "t", [0, 0, 0, 0], [0, 1, 2, 3], random_pages(4, 4))
    store.delete("t", 0, make_keys([0], [0]))
    put(store, "u", [1], [1], random_pages(1, 5))
    assert store.free_pages == 0
    store.close()


def test_tenants_are_isolated(arena: Path) -> None:
    store = PageStore(arena, 8)
    put(store, "alice", [0], [0], random_pages(1, 1))
    assert not store.get("bob", 0, make_keys([0], [0])).found.any()
    assert store.delete("bob", 0, make_keys([0], [0])) == 0
    assert store.drop_slab("bob", 0, 0) == 0
    assert store.get("alice", 0, make_keys([0], [0])).found.all()
    store.close()


def test_restart_rebuilds_index_byte_identical(arena: Path) -> None:
    store = PageStore(arena, 256)
    data = random_pages(100, 9)
    rng = np.random.default_rng(3)
    slabs = rng.integers(0, 5, 100).tolist()
    pages_idx = rng.choice(SLAB_PAGES, 100, replace=False).tolist()
    put(store, "t", slabs, pages_idx, data, volume=3)
    put(store, "u", [0], [0], random_pages(1, 4))
    store.delete("t", 3, make_keys(slabs[:10], pages_idx[:10]))
    inventory = store.inventory()
    store.close()  # no flush needed for correctness: a SIGKILL test covers that path

    reopened = PageStore(arena, 256)
    assert reopened.inventory() == inventory
    assert reopened.used_pages == 91
    result = reopened.get("t", 3, make_keys(slabs, pages_idx))
    assert result.found.tolist() == [False] * 10 + [True] * 90
    assert np.array_equal(result.data[10:], data[10:])
    assert np.array_equal(result.seals[10:], seals_of(data[10:]))  # seals live in the arena
    # Freed slots are reusable after the restart.
    put(reopened, "t", [0] * 165, list(range(165)), random_pages(165, 5), volume=9)
    assert reopened.free_pages == 0
    reopened.close()


def test_forget_wipes_and_capacity_mismatch_is_refused(arena: Path) -> None:
    store = PageStore(arena, 16)
    put(store, "t", [0], [0], random_pages(1))
    store.close()
    with pytest.raises(ArenaError, match="--forget"):
        PageStore(arena, 32)
    wiped = PageStore(arena, 32, forget=True)
    assert wiped.used_pages == 0 and wiped.inventory() == []
    wiped.close()


def test_second_opener_is_refused_and_foreign_file_too(arena: Path, shm_dir: Path) -> None:
    store = PageStore(arena, 4)
    with pytest.raises(ArenaError, match="in use"):
        PageStore(arena, 4)
    store.close()
    foreign = shm_dir / "foreign"
    foreign.write_bytes(os.urandom(8192))
    with pytest.raises(ArenaError, match="not a remem arena"):
        PageStore(foreign, 4)


def test_push_semantics_keep_newer_pages(arena: Path) -> None:
    store = PageStore(arena, 8)
    newer = random_pages(1, 1)
    put(store, "t", [2], [5], newer)
    older = random_pages(2, 2)
    assert put(store, "t", [2, 2], [5, 6], older, overwrite=False) == (1, 1)
    result = store.get("t", 0, make_keys([2, 2], [5, 6]))
    assert np.array_equal(result.data[0], newer[0])
    assert np.array_equal(result.data[1], older[1])
    assert np.array_equal(result.seals, seals_of(np.stack([newer[0], older[1]])))
    assert store.slab_pages("t", 0, 2).tolist() == [5, 6]
    assert store.drop_slab("t", 0, 2) == 2
    assert store.used_pages == 0
    store.close()


def test_half_written_records_are_discarded_on_open(arena: Path) -> None:
    store = PageStore(arena, 8)
    put(store, "t", [0], [0], random_pages(1))
    # A kill during allocation can leave a used record naming an unknown tenant.
    store._arena.slots["state"][5] = SLOT_USED
    store._arena.slots["tenant"][5] = 7
    store.close()
    reopened = PageStore(arena, 8)
    assert reopened.used_pages == 1
    assert reopened.free_pages == 7
    reopened.close()


def test_format_1_arena_is_refused(arena: Path) -> None:
    """Format 1 had no seals: its pages could not be decrypted, so it is not reused."""
    store = PageStore(arena, 4)
    store.close()
    slots_offset, data_offset, _ = arena_layout(4)
    with arena.open("r+b") as raw:
        raw.write(HEADER.pack(MAGIC, 1, PAGE_SIZE, 4, slots_offset, data_offset))
    with pytest.raises(ArenaError, match="not a remem arena of this format"):
        PageStore(arena, 4)


@pytest.mark.parametrize("batch", [1, 3, 16, 17, 200])
def test_lookups_small_and_large_agree_with_a_model(arena: Path, batch: int) -> None:
    """Small batches are looked up in plain Python, larger ones with numpy: both find exactly
    the pages a dict says are there, in any mix of slabs, present and absent."""
    store = PageStore(arena, 512)
    rng = np.random.default_rng(batch)
    model: dict[tuple[int, int], int] = {}
    for start in range(0, 400, 40):
        slabs = rng.integers(0, 4, 40).tolist()
        pages = rng.integers(0, 64, 40).tolist()
        pairs = list(dict.fromkeys(zip(slabs, pages, strict=True)))  # no page twice a batch
        data = random_pages(len(pairs), seed=start)
        put(store, "t", [s for s, _ in pairs], [p for _, p in pairs], data)
        for index, pair in enumerate(pairs):
            model[pair] = int(checksum_pages(data[index : index + 1])[0])
    for _ in range(50):
        wanted = list(
            dict.fromkeys(
                zip(
                    rng.integers(0, 5, batch).tolist(),
                    rng.integers(0, 64, batch).tolist(),
                    strict=True,
                )
            )
        )
        result = store.get("t", 0, make_keys([s for s, _ in wanted], [p for _, p in wanted]))
        assert result.found.tolist() == [pair in model for pair in wanted]
        assert result.crcs.tolist() == [model.get(pair, 0) for pair in wanted]
        assert np.array_equal(checksum_pages(result.data)[result.found], result.crcs[result.found])
    store.close()

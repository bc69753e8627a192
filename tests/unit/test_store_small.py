"""The store's small-batch paths (no numpy) against its numpy paths, on a real arena."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from remem_common.protocol.pages import (
    PAGE_SIZE,
    SEAL_BYTES,
    SMALL_PAGES,
    checksum_pages,
    key_words,
    make_keys,
)
from remem_pageserver.store import PageStore


def random_pages(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, PAGE_SIZE), dtype=np.uint8)


def random_seals(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, SEAL_BYTES), dtype=np.uint8)


@pytest.fixture
def store(shm_dir: Path) -> Iterator[PageStore]:
    store = PageStore(shm_dir / "small.arena", 1024)
    yield store
    store.close()


def batches(rng: np.random.Generator, count: int) -> tuple[list[int], list[int]]:
    """`count` distinct keys over three slabs, one of them never written."""
    slabs, pages = rng.integers(0, 3, 64).tolist(), rng.integers(0, 40, 64).tolist()
    chosen = list(dict.fromkeys(zip(slabs, pages, strict=True)))[:count]
    return [slab for slab, _ in chosen], [page for _, page in chosen]


@pytest.mark.parametrize("count", [1, 2, 7, SMALL_PAGES])
def test_get_small_answers_what_get_answers(store: PageStore, count: int) -> None:
    rng = np.random.default_rng(count)
    pages_idx = rng.permutation(40)[:30]
    data = random_pages(30, seed=1)
    store.put(
        "t",
        0,
        make_keys([0] * 15 + [1] * 15, pages_idx),
        checksum_pages(data),
        data,
        random_seals(30, seed=2),
    )
    for _ in range(40):
        slabs, pages = batches(rng, count)
        keys = make_keys(slabs, pages)
        expected = store.get("t", 0, keys)
        found, crcs, got, seals = store.get_small("t", 0, key_words(keys.tobytes(), count))
        assert found == expected.found.view(np.uint8).tobytes()
        assert crcs == expected.crcs.tobytes()
        assert got == expected.data.tobytes()
        assert seals == expected.seals.tobytes()
    found, crcs, got, seals = store.get_small("nobody", 0, key_words(keys.tobytes(), count))
    assert (found, crcs, got, seals) == (
        bytes(count),
        bytes(4 * count),
        bytes(PAGE_SIZE * count),
        bytes(SEAL_BYTES * count),
    )


def test_overwrite_small_stores_only_batches_of_held_pages(store: PageStore) -> None:
    keys = make_keys([0, 0, 1], [3, 9, 3])
    data = random_pages(3, seed=3)
    store.put("t", 0, keys, checksum_pages(data), data, random_seals(3, seed=4))
    used = store.used_pages
    new_data, new_seals = random_pages(3, seed=5), random_seals(3, seed=6)
    new_crcs = checksum_pages(new_data)
    words = key_words(keys.tobytes(), 3)
    stored = store.overwrite_small(
        "t",
        0,
        words,
        tuple(new_crcs.tolist()),
        memoryview(new_data.tobytes()),
        memoryview(new_seals.tobytes()),
    )
    assert stored == 3 and store.used_pages == used
    result = store.get("t", 0, keys)
    assert np.array_equal(result.data, new_data) and np.array_equal(result.seals, new_seals)
    assert result.crcs.tolist() == new_crcs.tolist()
    # A page not held yet, or a tenant never seen: nothing stored, `put` must do it.
    with_new = key_words(make_keys([0, 0], [3, 10]).tobytes(), 2)
    for tenant, refused in (("t", with_new), ("other", words[:4])):
        before = store.get("t", 0, keys)
        assert (
            store.overwrite_small(
                tenant,
                0,
                refused,
                (0, 0),
                memoryview(bytes(2 * PAGE_SIZE)),
                memoryview(bytes(2 * SEAL_BYTES)),
            )
            is None
        )
        after = store.get("t", 0, keys)
        assert np.array_equal(before.data, after.data) and store.used_pages == used

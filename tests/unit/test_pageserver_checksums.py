"""A large batch's checksums checked whole (remem_pageserver.checksums) against crc32c itself
and against the page-by-page check it stands in for; and a store that copies a batch of
consecutive slots as one block."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import crc32c
import numpy as np
import pytest
from remem_common.protocol.pages import (
    MAX_BATCH_PAGES,
    PAGE_SIZE,
    SEAL_BYTES,
    bad_checksums,
    checksum_pages,
    make_keys,
)
from remem_pageserver.checksums import batch_matches, predicted_crc
from remem_pageserver.store import PageStore


def random_pages(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, PAGE_SIZE), dtype=np.uint8)


@pytest.mark.parametrize("count", [1, 2, 31, 32, 33, 64, 255, 256, 1000, MAX_BATCH_PAGES])
def test_predicted_crc_is_the_batch_crc(count: int) -> None:
    pages = random_pages(count, count)
    crcs = checksum_pages(pages)
    assert predicted_crc(crcs) == crc32c.crc32c(pages.tobytes())
    assert batch_matches(pages, crcs)


@pytest.mark.parametrize("count", [64, 256, MAX_BATCH_PAGES])
def test_any_one_bad_page_fails_the_batch(count: int) -> None:
    rng = np.random.default_rng(count)
    pages = random_pages(count, count)
    crcs = checksum_pages(pages)
    for _ in range(20):
        bad = pages.copy()
        page, byte = int(rng.integers(count)), int(rng.integers(PAGE_SIZE))
        bad[page, byte] ^= 1 << int(rng.integers(8))
        assert not batch_matches(bad, crcs)
        assert bad_checksums(bad, crcs).tolist() == [page]
        wrong = crcs.copy()
        wrong[page] ^= 1 << int(rng.integers(32))
        assert not batch_matches(pages, wrong)


def test_pages_out_of_order_fail_the_batch() -> None:
    pages = random_pages(128, 7)
    crcs = checksum_pages(pages)
    swapped = pages[[1, 0, *range(2, 128)]]
    assert not batch_matches(swapped, crcs)


@pytest.fixture
def store(shm_dir: Path) -> Iterator[PageStore]:
    store = PageStore(shm_dir / "runs.arena", 4096)
    yield store
    store.close()


@pytest.mark.parametrize("order", ["ascending", "descending", "shuffled"])
def test_store_reads_back_a_batch_in_any_slot_order(store: PageStore, order: str) -> None:
    """A fresh batch lands in consecutive slots (copied as one block), or not; either way
    every page reads back as written, also after an overwrite."""
    rng = np.random.default_rng(3)
    index = np.arange(300)
    if order == "descending":
        index = index[::-1]
    elif order == "shuffled":
        rng.shuffle(index)
    keys = make_keys(np.zeros(300, dtype=np.uint32), index)
    for seed in (1, 2):
        pages = random_pages(300, seed)
        seals = rng.integers(0, 256, (300, SEAL_BYTES), dtype=np.uint8)
        crcs = checksum_pages(pages)
        assert store.put("t", 0, keys, crcs, pages, seals) == (300, 0)
        got = store.get("t", 0, keys)
        assert got.found.all()
        np.testing.assert_array_equal(got.data, pages)
        np.testing.assert_array_equal(got.crcs, crcs)
        np.testing.assert_array_equal(got.seals, seals)
        got.data[:] = 0  # the reply owns its bytes: the arena keeps the pages
        np.testing.assert_array_equal(store.get("t", 0, keys[:20]).data, pages[:20])

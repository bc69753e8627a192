"""The remote backend's page map: per-page bitmaps (written, unreplicated), one bit per page."""

from __future__ import annotations

import numpy as np
import pytest
from remem_client.remote.pagemap import PageMap, bits_of, runs, set_bits, slab_segments
from remem_common.protocol.pages import MAX_BATCH_PAGES, SLAB_PAGES

PAGES = 4096


@pytest.mark.parametrize("seed", range(4))
def test_set_bits_matches_a_plain_boolean_model(seed: int) -> None:
    """Runs of every length, short (the Python-int path) and long (numpy), set and cleared
    at every bit offset: the bitmap always equals a boolean array updated the obvious way."""
    rng = np.random.default_rng(seed)
    bitmap = np.zeros(PAGES // 8, dtype=np.uint8)
    model = np.zeros(PAGES, dtype=np.bool_)
    for _ in range(2000):
        count = int(rng.choice([1, 2, 7, 8, 9, 63, 64, 65, 127, 128, 129, 300, 1000]))
        first = int(rng.integers(0, PAGES - count + 1))
        value = bool(rng.integers(0, 2))
        before = set_bits(bitmap, first, count, value)
        assert before == int(model[first : first + count].sum())
        model[first : first + count] = value
        assert np.array_equal(bits_of(bitmap, 0, PAGES), model)


def test_the_unreplicated_bitmap_exists_only_while_some_page_is_mirror_only() -> None:
    pages = PageMap(2 * SLAB_PAGES)
    healthy = pages.nbytes()
    assert pages.unreplicated is None and not pages.any_unreplicated(0, 64)
    pages.set_unreplicated(5, 3, True)
    pages.set_unreplicated(6, 4, True)  # overlapping: counted once
    assert pages.unreplicated_pages == 5
    assert pages.any_unreplicated(9, 1) and not pages.any_unreplicated(10, 50)
    assert pages.unreplicated_mask(4, 7).tolist() == [False] + [True] * 5 + [False]
    assert pages.unreplicated_list().tolist() == [5, 6, 7, 8, 9]
    assert pages.nbytes() == 2 * healthy
    pages.set_unreplicated(0, 64, False)
    assert pages.unreplicated is None and pages.unreplicated_pages == 0
    assert pages.nbytes() == healthy


def test_pages_of_an_adopted_slab_may_hold_data_and_the_mirrors_marks_are_written() -> None:
    pages = PageMap(2 * SLAB_PAGES)
    assert not pages.written_anywhere()
    pages.unknown[1] = True  # adopted from placement's map: contents unknown
    assert pages.maybe_written(SLAB_PAGES - 2, 4).tolist() == [False, False, True, True]
    assert pages.written_anywhere() and pages.written_pages() == 0
    bitmap = bytes([0b1010_0000, 0xFF])  # pages 5, 7 and 8..15
    assert pages.adopt_unreplicated(bitmap) == 10
    assert pages.written_pages() == 10 and pages.written_bits(4, 5) == 0b11010


def test_runs_and_slab_segments() -> None:
    assert runs(np.array([1, 2, 3, 7, 9, 10])) == [(1, 3), (7, 1), (9, 2)]
    assert runs(np.array([], dtype=np.intp)) == []
    # Cut at a slab boundary and at the largest batch a message carries.
    first = SLAB_PAGES - 10
    assert slab_segments(first, 20) == [(first, 10), (SLAB_PAGES, 10)]
    assert slab_segments(0, MAX_BATCH_PAGES + 1) == [(0, MAX_BATCH_PAGES), (MAX_BATCH_PAGES, 1)]

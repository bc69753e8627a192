"""The client's per-page bitmaps (written, unreplicated): one bit per page of the device."""

from __future__ import annotations

import numpy as np
import pytest
from remem_client.remote_backend import _bits_of, _set_bits

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
        before = _set_bits(bitmap, first, count, value)
        assert before == int(model[first : first + count].sum())
        model[first : first + count] = value
        assert np.array_equal(_bits_of(bitmap, 0, PAGES), model)

"""MirrorStore.write_pages: a group's runs staged once, adjacent ones merged, written together
(one io_submit where Linux AIO and O_DIRECT are there), a page written twice in order."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from remem_common.protocol.pages import PAGE_SIZE
from remem_mirror.aio import NOT_SUBMITTED, AioWriter
from remem_mirror.store import MAX_RUN_PAGES, MirrorStore

PAGES = 4096


def pages_of(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, PAGE_SIZE), dtype=np.uint8)


@pytest.fixture(params=["auto", "off"])
def store(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[MirrorStore]:
    opened = MirrorStore(
        tmp_path / "m.img", PAGES, tmp_path / "m.img.meta", direct_io=request.param
    )
    yield opened
    opened.close()


def test_scattered_runs_land_at_their_pages(store: MirrorStore) -> None:
    rng = np.random.default_rng(1)
    firsts = rng.choice(PAGES // 4, 40, replace=False) * 4  # 1-3 pages each: never adjacent
    counts = rng.integers(1, 4, 40)
    data = pages_of(int(counts.sum()), 2)
    # Two ops' chunks, the runs split between them.
    split = int(counts[:25].sum())
    runs = [(int(f), int(c)) for f, c in zip(firsts, counts, strict=True)]
    issued, failed = store.write_pages([data[:split], data[split:]], runs)
    assert (issued, failed) == (40, [])
    at = 0
    for first, count in runs:
        assert store.read(first, count) == data[at : at + count].tobytes()
        at += count


def test_adjacent_runs_become_one_write_across_ops(store: MirrorStore) -> None:
    data = pages_of(8, 3)
    runs = [(100, 2), (102, 1), (103, 3), (500, 1), (501, 1)]
    issued, failed = store.write_pages([data[:3], data[3:6], data[6:]], runs)
    assert (issued, failed) == (2, [])
    assert store.read(100, 6) == data[:6].tobytes()
    assert store.read(500, 2) == data[6:].tobytes()


def test_a_later_run_of_a_page_wins(store: MirrorStore) -> None:
    versions = pages_of(7, 4)
    runs = [(7, 2), (300, 1), (8, 1), (7, 1), (301, 1), (500, 1)]
    store.write_pages([versions], runs)
    assert store.read(7, 2) == versions[4].tobytes() + versions[3].tobytes()
    assert store.read(300, 2) == versions[2].tobytes() + versions[5].tobytes()


def test_more_than_the_staging_buffer_goes_in_waves(store: MirrorStore) -> None:
    data = pages_of(3 * 600, 5)
    chunks = [data[:600], data[600:1200], data[1200:]]
    runs = [(k * 700, 600) for k in range(3)]
    assert MAX_RUN_PAGES < 3 * 600
    issued, failed = store.write_pages(chunks, runs)
    assert (issued, failed) == (3, [])
    for k in range(3):
        assert store.read(k * 700, 256) == chunks[k][:256].tobytes()
        assert store.read(k * 700 + 344, 256) == chunks[k][344:].tobytes()


def test_a_failed_write_is_reported_with_its_pages(
    store: MirrorStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = pages_of(4, 6)
    real = store._write_staged

    def failing(at: int, pages: int, first: int) -> None:
        if first == 50:
            raise OSError(errno.EIO, "Input/output error")
        real(at, pages, first)

    monkeypatch.setattr(store, "_write_staged", failing)
    if store._aio is not None:
        # The batch refuses the run at page 50: it is written again alone, and fails.
        aio = store._aio
        submit = aio.pwrite

        def refuse_second(*args: list[int]) -> list[int]:
            results = submit(*args)
            results[1] = -errno.EIO
            return results

        monkeypatch.setattr(aio, "pwrite", refuse_second)
    _, failed = store.write_pages([data], [(10, 2), (50, 1), (90, 1)])
    assert [(at, pages) for at, pages, _ in failed] == [(2, 1)]
    assert failed[0][2].errno == errno.EIO
    assert store.read(10, 2) == data[:2].tobytes()
    assert store.read(90, 1) == data[3].tobytes()


def test_aio_submits_a_batch_and_reports_each_result(tmp_path: Path) -> None:
    store = MirrorStore(tmp_path / "m.img", PAGES, tmp_path / "m.img.meta", direct_io="auto")
    try:
        aio = store._aio
        if aio is None:
            pytest.skip("no Linux AIO with O_DIRECT here")
        assert isinstance(aio, AioWriter)
        data = pages_of(3, 7)
        store._stage([data])
        base = store._staging_address
        results = aio.pwrite(
            [base, base + PAGE_SIZE, base + 2 * PAGE_SIZE],
            [PAGE_SIZE] * 3,
            [5 * PAGE_SIZE, 9 * PAGE_SIZE, 1 << 52],  # the last: past any disk
        )
        assert results[:2] == [PAGE_SIZE, PAGE_SIZE]
        assert results[2] < 0 or results[2] == NOT_SUBMITTED
        assert store.read(5, 1) == data[0].tobytes() and store.read(9, 1) == data[1].tobytes()
    finally:
        store.close()

"""The mirror store: pages at their offsets, coalesced runs, trim, O_DIRECT, the bitmap."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import remem_mirror.store as store_module
from remem_common.protocol.pages import PAGE_SIZE
from remem_mirror.store import (
    MAX_RUN_PAGES,
    MirrorStore,
    MirrorStoreError,
    bitmap_nbytes,
    plan_runs,
)

PAGES = 512


def pages_of(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, PAGE_SIZE), dtype=np.uint8)


@pytest.fixture
def paths(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "mirror.img", tmp_path / "mirror.img.meta"


@pytest.fixture
def store(paths: tuple[Path, Path]) -> Iterator[MirrorStore]:
    opened = MirrorStore(paths[0], PAGES, paths[1])
    yield opened
    opened.close()


def direct_io_supported(directory: Path) -> bool:
    """Whether this file system takes O_DIRECT, probed independently of the store."""
    probe = directory / "probe"
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError as exc:
        assert exc.errno == errno.EINVAL
        return False
    os.close(fd)
    probe.unlink()
    return True


def test_created_sized_and_zero(store: MirrorStore, paths: tuple[Path, Path]) -> None:
    assert paths[0].stat().st_size == PAGES * PAGE_SIZE
    assert not store.read(0, 256).strip(b"\0")
    assert store.unreplicated_pages == 0
    assert len(store.bitmap_bytes()) == bitmap_nbytes(PAGES) == PAGES // 8


def test_o_direct_is_used_on_tmp(store: MirrorStore, tmp_path: Path) -> None:
    expected = direct_io_supported(tmp_path)
    assert store.direct_io is expected
    flags = fcntl.fcntl(store._fd, fcntl.F_GETFL)
    assert bool(flags & os.O_DIRECT) is expected


def test_refused_o_direct_falls_back_to_buffered_with_a_warning(
    paths: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_open = os.open

    def no_direct(path: object, flags: int, mode: int = 0o777) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode)  # type: ignore[arg-type]

    monkeypatch.setattr(store_module.os, "open", no_direct)
    with pytest.raises(MirrorStoreError, match="cannot open"):
        MirrorStore(paths[0], PAGES, paths[1], direct_io="on")
    with caplog.at_level(logging.WARNING, logger="mirror"):
        buffered = MirrorStore(paths[0], PAGES, paths[1], direct_io="auto")
    try:
        assert not buffered.direct_io
        assert "O_DIRECT refused" in caplog.text
        assert not fcntl.fcntl(buffered._fd, fcntl.F_GETFL) & os.O_DIRECT
        data = pages_of(5, 1)
        assert buffered.write_runs([(3, 2, data[:2]), (5, 3, data[2:])]) == 1
        assert buffered.read(3, 5) == data.tobytes()
    finally:
        buffered.close()
    monkeypatch.undo()
    off = MirrorStore(paths[0], PAGES, paths[1], direct_io="off")
    try:
        assert not off.direct_io
        assert off.read(3, 5) == data.tobytes()
    finally:
        off.close()


def test_pages_round_trip_at_their_offsets(store: MirrorStore, paths: tuple[Path, Path]) -> None:
    data = pages_of(300, 2)
    assert store.write_run(10, [data[:256]]) == 256 * PAGE_SIZE
    assert store.write_run(266, [data[256:]]) == 44 * PAGE_SIZE
    assert store.read(10, 256) == data[:256].tobytes()
    assert store.read(266, 44) == data[256:].tobytes()
    assert not store.read(0, 10).strip(b"\0")
    assert not store.read(310, 200).strip(b"\0")
    # The file is a plain image of the device: page i at byte i x 4096.
    raw = np.fromfile(paths[0], dtype=np.uint8).reshape(PAGES, PAGE_SIZE)
    assert np.array_equal(raw[10:310], data)


def test_plan_runs_cuts_at_gaps_overlaps_and_the_buffer() -> None:
    assert plan_runs([0, 1, 2, 3], [1, 1, 1, 1], 1024) == [0]
    assert plan_runs([0, 4, 8], [4, 4, 4], 1024) == [0]
    assert plan_runs([0, 2, 3], [1, 1, 1], 1024) == [0, 1]  # gap
    assert plan_runs([5, 5], [1, 1], 1024) == [0, 1]  # the same page again
    assert plan_runs([4, 5, 4], [1, 1, 2], 1024) == [0, 2]  # overlap starts a new run
    assert plan_runs([9, 8], [1, 1], 1024) == [0, 1]  # descending is not adjacent
    assert plan_runs([0, 256, 512, 768, 1024], [256] * 5, 1024) == [0, 4]
    assert plan_runs([], [], 1024) == []


def test_adjacent_writes_coalesce_and_later_writes_win(store: MirrorStore) -> None:
    data = pages_of(64, 3)
    writes = [(100 + i, 1, data[i]) for i in range(64)]
    assert store.write_runs(writes) == 1
    assert store.read(100, 64) == data.tobytes()
    newer = pages_of(3, 4)
    # 7..9 then 8 again (overlap: a new run), then 9..10 continuing from 8.
    syscalls = store.write_runs([(7, 3, pages_of(3, 5)), (8, 1, newer[0]), (9, 2, newer[1:])])
    assert syscalls == 2
    got = np.frombuffer(store.read(7, 4), dtype=np.uint8).reshape(4, PAGE_SIZE)
    assert np.array_equal(got[0], pages_of(3, 5)[0])
    assert np.array_equal(got[1:], newer)
    big = pages_of(MAX_RUN_PAGES // 8 + 1, 6)
    many = [(i * 8 % PAGES, 8, big[:8]) for i in range(MAX_RUN_PAGES // 8 + 1)]
    assert store.write_runs(many[: PAGES // 8]) == 1  # 512 adjacent pages


def test_trim_reads_zeros_and_clears_bits(store: MirrorStore) -> None:
    data = pages_of(20, 7)
    store.write_run(0, [data])
    store.set_unreplicated(0, 20)
    store.trim(5, 10)
    got = np.frombuffer(store.read(0, 20), dtype=np.uint8).reshape(20, PAGE_SIZE)
    assert np.array_equal(got[:5], data[:5]) and np.array_equal(got[15:], data[15:])
    assert not got[5:15].any()
    assert store.unreplicated_pages == 10
    assert store.unreplicated()[:20].tolist() == [True] * 5 + [False] * 10 + [True] * 5
    # Where holes cannot be punched, zeros are written instead.
    store._punch_holes = False
    store.trim(0, 5)
    assert not store.read(0, 15).strip(b"\0")
    assert store.read(15, 5) == data[15:].tobytes()


def test_bitmap_ranges_match_a_reference(store: MirrorStore) -> None:
    rng = np.random.default_rng(8)
    reference = np.zeros(PAGES, dtype=np.bool_)
    for _ in range(400):
        first = int(rng.integers(0, PAGES))
        count = int(rng.integers(1, min(40, PAGES - first) + 1))
        if rng.random() < 0.5:
            changed = store.set_unreplicated(first, count)
            assert changed == int((~reference[first : first + count]).sum())
            reference[first : first + count] = True
        else:
            changed = store.clear_unreplicated(first, count)
            assert changed == int(reference[first : first + count].sum())
            reference[first : first + count] = False
        assert store.unreplicated_pages == int(reference.sum())
    assert np.array_equal(store.unreplicated(), reference)
    # Little-endian bit order: bit i is bit i % 8 of byte i // 8.
    assert store.bitmap_bytes() == np.packbits(reference, bitorder="little").tobytes()


def test_bitmap_edges(store: MirrorStore) -> None:
    assert store.set_unreplicated(PAGES - 1, 1) == 1
    assert store.set_unreplicated(3, 2) == 2
    assert store.set_unreplicated(0, 8) == 6
    assert store.bitmap_bytes()[0] == 0xFF and store.bitmap_bytes()[-1] == 0x80
    assert store.clear_unreplicated(0, PAGES) == 9
    assert store.unreplicated_pages == 0


def test_data_and_bitmap_survive_reopen(paths: tuple[Path, Path]) -> None:
    data = pages_of(8, 9)
    first = MirrorStore(paths[0], PAGES, paths[1])
    first.write_run(40, [data])
    first.set_unreplicated(40, 8)
    first.set_unreplicated(500, 12)
    first.sync_bitmap()
    before = first.bitmap_bytes()
    first.close()
    again = MirrorStore(paths[0], PAGES, paths[1])
    try:
        assert again.unreplicated_pages == 20
        assert again.bitmap_bytes() == before
        assert again.read(40, 8) == data.tobytes()
    finally:
        again.close()


def test_forget_zeroes_data_and_bitmap(paths: tuple[Path, Path]) -> None:
    first = MirrorStore(paths[0], PAGES, paths[1])
    first.write_run(0, [pages_of(4, 10)])
    first.set_unreplicated(0, 4)
    first.close()
    wiped = MirrorStore(paths[0], PAGES, paths[1], forget=True)
    try:
        assert wiped.unreplicated_pages == 0
        assert not wiped.read(0, 4).strip(b"\0")
    finally:
        wiped.close()


def test_wrong_sizes_are_refused_and_nothing_is_changed(paths: tuple[Path, Path]) -> None:
    MirrorStore(paths[0], PAGES, paths[1]).close()
    with pytest.raises(MirrorStoreError, match="--forget"):
        MirrorStore(paths[0], PAGES * 2, paths[1])  # the bitmap is for 512 pages
    assert paths[0].stat().st_size == PAGES * PAGE_SIZE  # not grown before refusing
    paths[1].unlink()
    with pytest.raises(MirrorStoreError, match="has 2097152 bytes"):
        MirrorStore(paths[0], PAGES // 2, paths[1])  # the file is larger than --size
    # A shorter file (no bitmap says otherwise) is grown.
    grown = MirrorStore(paths[0], PAGES * 2, paths[1])
    grown.close()
    assert paths[0].stat().st_size == 2 * PAGES * PAGE_SIZE
    smaller = MirrorStore(paths[0], PAGES // 2, paths[1], forget=True)
    smaller.close()
    assert paths[0].stat().st_size == PAGES // 2 * PAGE_SIZE


def test_unusable_paths_are_refused(tmp_path: Path, paths: tuple[Path, Path]) -> None:
    with pytest.raises(MirrorStoreError, match="neither a regular file"):
        MirrorStore(tmp_path, PAGES, paths[1])
    with pytest.raises(MirrorStoreError, match="cannot open"):
        MirrorStore(tmp_path / "no" / "such" / "dir", PAGES, paths[1])
    MirrorStore(paths[0], PAGES, paths[1]).close()
    paths[1].write_bytes(b"garbage" * 1000)
    with pytest.raises(MirrorStoreError, match="not a remem mirror bitmap"):
        MirrorStore(paths[0], PAGES, paths[1])
    # A new (empty) data file makes any old bitmap meaningless: it starts clear.
    paths[0].unlink()
    MirrorStore(paths[0], PAGES, paths[1]).close()


def test_a_second_store_on_the_same_file_is_refused(
    store: MirrorStore, paths: tuple[Path, Path]
) -> None:
    with pytest.raises(MirrorStoreError, match="in use by another mirror"):
        MirrorStore(paths[0], PAGES, paths[1])


def test_fdatasync_is_timed(store: MirrorStore) -> None:
    store.write_run(0, [pages_of(1, 11)])
    before = store.fdatasync_seconds
    took = store.fdatasync()
    assert took > 0
    assert store.fdatasync_seconds == pytest.approx(before + took)


@pytest.mark.root
def test_a_block_device_is_used_in_place(tmp_path: Path) -> None:
    """A loop device stands in for a disk partition: used as is, never resized."""
    import shutil
    import subprocess

    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("needs root and losetup")
    image = tmp_path / "disk.img"
    image.write_bytes(b"\xaa" * (2 * PAGES * PAGE_SIZE))
    loop = subprocess.run(
        ["losetup", "--find", "--show", str(image)], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        with pytest.raises(MirrorStoreError, match="block device"):
            MirrorStore(Path(loop), 4 * PAGES, tmp_path / "big.meta")
        store = MirrorStore(Path(loop), PAGES, tmp_path / "loop.meta", forget=True)
        try:
            assert store.direct_io
            assert not store.read(0, 256).strip(b"\0")  # --forget zeroed what it mirrors
            data = pages_of(4, 12)
            assert store.write_runs([(3, 4, data)]) == 1
            assert store.read(3, 4) == data.tobytes()
            store.trim(3, 2)
            assert not store.read(3, 2).strip(b"\0") and store.read(5, 2) == data[2:].tobytes()
        finally:
            store.close()
    finally:
        subprocess.run(["losetup", "--detach", loop], check=True)

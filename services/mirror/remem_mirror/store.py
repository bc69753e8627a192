"""The mirror store: pages at their device offsets in one file or block device, plus a bitmap.

No transport code here: the server's writer thread calls these methods with the buffers it
received; nothing in this module creates a Python object per page.

Data (`path`): page i lives at byte offset i x 4096, so the file is a plain image of the
client's device. It is opened with O_DIRECT: the mirror copies every page-out of a host that
is short of memory, and filling that host's page cache with the same pages again would defeat
the point. O_DIRECT needs the buffer, offset and length aligned; offsets and lengths are whole
pages, and the buffers are anonymous mmaps (page aligned), into which each run of pages is
copied once before its single pwrite. Where the file system refuses O_DIRECT (EINVAL), `auto`
falls back to buffered I/O and drops the written range from the page cache with
posix_fadvise(DONTNEED).

Bitmap (`meta_path`): which pages are held by the mirror only ("unreplicated": written while
no replica could be reached), one bit per page, little-endian bit order (bit i is bit i % 8 of
byte i // 8), the layout `list_unreplicated_reply` sends::

    offset 0      header (4 KiB): magic, format, page size, page count, then (offset 24)
                  a u32 `clean`: 1 if the last client session ended cleanly (the mirror
                  held every write its client acknowledged), 0 while a session is open,
                  after a crash of either side, and in a new or wiped mirror
    offset 4096   ceil(page_count / 8) bytes of bitmap, padded to whole pages

The file is mapped shared, so a bit set here is in the kernel's page cache at once and
survives a SIGKILL of the mirror; setting bits also msyncs them before the write they guard
is acknowledged, so they survive a crash of the host too. Clearing is synced lazily (at the
next set, fdatasync or close): a clear lost to a power failure only repeats a resync.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import logging
import mmap
import os
import stat
import struct
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from remem_common.locking import lock_exclusive
from remem_common.protocol.pages import PAGE_SIZE

from remem_mirror.aio import AioWriter

log = logging.getLogger("mirror")

MAGIC = b"REMEMMR\x01"
FORMAT_VERSION = 1
META_HEADER = struct.Struct("<8sIIQ")  # magic, format, page size, page count
META_HEADER_BYTES = 4096
CLEAN = struct.Struct("<I")  # right after META_HEADER
# The largest run of adjacent pages written in one syscall: the staging buffer's size (4 MiB).
# Past a few MiB a bigger pwrite no longer gets faster, and the writer answers nothing of a
# batch until its runs are on disk.
MAX_RUN_PAGES = 1024
# Reads come one request at a time, at most MAX_MIRROR_PAGES (1 MiB) each.
READ_BUFFER_PAGES = 256
# One zero-filling pwrite (trim without hole punching, --forget of a block device).
ZERO_PAGES = 256

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

Buffer = Any  # anything with the buffer protocol: bytes, zmq.Frame, numpy arrays, memoryviews
DirectIOMode = Literal["auto", "on", "off"]

# popcount of every byte value, to count set bits of a bitmap span without unpacking it.
_POPCOUNT = np.array([bin(value).count("1") for value in range(256)], dtype=np.uint8)


class MirrorStoreError(Exception):
    """The mirror file or bitmap cannot be used as it is (size, format, locked, no O_DIRECT)."""


def _align(value: int, to: int = PAGE_SIZE) -> int:
    return (value + to - 1) // to * to


def bitmap_nbytes(page_count: int) -> int:
    """Bytes of the unreplicated bitmap of `page_count` pages: ceil(page_count / 8)."""
    return (page_count + 7) // 8


def plan_runs(firsts: Sequence[int], counts: Sequence[int], max_pages: int) -> list[int]:
    """Where to cut a sequence of writes into runs of adjacent pages, one syscall each.

    Write j joins the run of write j-1 only if it starts right after it
    (`firsts[j-1] + counts[j-1] == firsts[j]`) and the run stays within `max_pages`. An
    overlap (a later write of a page already in the run) always starts a new run, and runs
    are written in order, so the later write still wins.

    Args:
        firsts, counts: the writes' first pages and page counts, in queue order.
        max_pages: the largest run (the staging buffer).

    Returns:
        The index where each run starts; run k is writes `[starts[k], starts[k+1])`.
    """
    starts: list[int] = []
    run_end = -1
    run_pages = 0
    for index, (first, count) in enumerate(zip(firsts, counts, strict=True)):
        if first == run_end and run_pages + count <= max_pages:
            run_pages += count
        else:
            starts.append(index)
            run_pages = count
        run_end = first + count
    return starts


def _overlap(firsts: Sequence[int], counts: Sequence[int]) -> bool:
    """Whether two of the page ranges `[firsts[k], firsts[k] + counts[k])` overlap."""
    spans = sorted(zip(firsts, counts, strict=True))
    return any(first + count > spans[k + 1][0] for k, (first, count) in enumerate(spans[:-1]))


def _load_fallocate() -> Any:
    """libc's fallocate via ctypes (os has posix_fallocate but not the punch-hole mode)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    func = getattr(libc, "fallocate64", None) or getattr(libc, "fallocate", None)
    if func is None:
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    func.restype = ctypes.c_int
    return func


_FALLOCATE = _load_fallocate()


class MirrorStore:
    """Pages of one device in one file, and the bitmap of pages held only here."""

    def __init__(
        self,
        path: Path,
        page_count: int,
        meta_path: Path,
        *,
        direct_io: DirectIOMode = "auto",
        forget: bool = False,
    ) -> None:
        """Open (or create) the mirror file and its bitmap.

        Args:
            path: a regular file (created, or grown to `page_count` pages) or a block device
                of at least `page_count` pages.
            page_count: pages of the mirrored device; must match an existing bitmap's.
            meta_path: the bitmap file (created if missing).
            direct_io: "on" requires O_DIRECT, "off" never uses it, "auto" falls back to
                buffered I/O with a warning where the file system refuses it.
            forget: zero the mirror and clear the bitmap.

        Raises:
            MirrorStoreError: wrong size or format, locked by another mirror, or no O_DIRECT
                with `direct_io="on"`.
        """
        if page_count < 1:
            raise MirrorStoreError("the mirror must hold at least one page")
        self.path = path
        self.meta_path = meta_path
        self.page_count = page_count
        self.size = page_count * PAGE_SIZE
        self.fdatasync_seconds = 0.0
        self._fd = -1
        self._meta_fd = -1
        if not forget:
            self._precheck_meta()  # refuse before the data file is created or resized
        self._fd, self.direct_io, created = self._open_data(path, direct_io, forget)
        try:
            self._open_meta(meta_path, reset=forget or created)
        except BaseException:
            os.close(self._fd)
            raise
        # Page-aligned buffers O_DIRECT can use: anonymous mmaps start on a page boundary.
        self._staging = mmap.mmap(-1, MAX_RUN_PAGES * PAGE_SIZE)
        self._read_buffer = mmap.mmap(-1, READ_BUFFER_PAGES * PAGE_SIZE)
        self._zeros = mmap.mmap(-1, ZERO_PAGES * PAGE_SIZE)  # never written: stays zero
        self._staging_view = memoryview(self._staging)
        self._staging_address = ctypes.addressof(ctypes.c_char.from_buffer(self._staging))
        # One io_submit per batch of runs (aio.py says why); O_DIRECT only: buffered writes
        # are copied into the page cache inside io_submit, one at a time anyway.
        self._aio = AioWriter.open(self._fd, MAX_RUN_PAGES) if self.direct_io else None
        self._read_view = memoryview(self._read_buffer)
        self._zeros_view = memoryview(self._zeros)
        self._punch_holes = _FALLOCATE is not None
        if forget and stat.S_ISBLK(os.fstat(self._fd).st_mode):
            self.trim(0, page_count)  # a regular file was truncated to nothing instead
            self.fdatasync()

    # -- opening ---------------------------------------------------------------------------

    def _open_data(self, path: Path, mode: DirectIOMode, forget: bool) -> tuple[int, bool, bool]:
        """(fd, O_DIRECT in use, file newly created) for the mirror file, sized and locked."""
        try:
            existing = path.stat()
        except FileNotFoundError:
            existing = None
        except OSError as exc:
            raise MirrorStoreError(f"cannot use {path}: {exc.strerror}") from None
        if existing is not None and not (
            stat.S_ISREG(existing.st_mode) or stat.S_ISBLK(existing.st_mode)
        ):
            raise MirrorStoreError(f"{path} is neither a regular file nor a block device")
        block = existing is not None and stat.S_ISBLK(existing.st_mode)
        flags = os.O_RDWR | os.O_CLOEXEC | (0 if block else os.O_CREAT)
        fd, direct = self._open_direct(path, flags, mode)
        if not lock_exclusive(fd):
            raise MirrorStoreError(f"{path} is in use by another mirror")
        try:
            created = self._size_data(fd, path, block, forget, existing is None)
            if direct and not self._probe_direct(fd, path, mode):
                direct = False
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        except BaseException:
            os.close(fd)
            raise
        return fd, direct, created

    def _open_direct(self, path: Path, flags: int, mode: DirectIOMode) -> tuple[int, bool]:
        try:
            if mode != "off":
                try:
                    return os.open(path, flags | os.O_DIRECT, 0o600), True
                except OSError as exc:
                    if exc.errno != errno.EINVAL or mode == "on":
                        raise
                    self._warn_buffered(path, exc)
            return os.open(path, flags, 0o600), False
        except OSError as exc:
            raise MirrorStoreError(f"cannot open {path}: {exc.strerror}") from None

    def _probe_direct(self, fd: int, path: Path, mode: DirectIOMode) -> bool:
        """Some file systems accept O_DIRECT at open and refuse the I/O: try one page."""
        probe = mmap.mmap(-1, PAGE_SIZE)
        try:
            os.preadv(fd, [probe], 0)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise MirrorStoreError(f"cannot read {path}: {exc.strerror}") from None
            if mode == "on":
                raise MirrorStoreError(
                    f"{path}: the file system refuses O_DIRECT I/O ({exc.strerror}); "
                    "use --direct-io auto or off"
                ) from None
            self._warn_buffered(path, exc)
            return False
        finally:
            probe.close()
        return True

    @staticmethod
    def _warn_buffered(path: Path, exc: OSError) -> None:
        log.warning(
            "O_DIRECT refused, using buffered writes + fadvise(DONTNEED) path=%s error=%s",
            path,
            exc.strerror,
        )

    def _size_data(self, fd: int, path: Path, block: bool, forget: bool, missing: bool) -> bool:
        """Check or set the data size; True if the file holds nothing from before."""
        have = os.lseek(fd, 0, os.SEEK_END)
        if block:
            if have < self.size:
                raise MirrorStoreError(
                    f"block device {path} has {have} bytes but --size asks for {self.size}"
                )
            return False
        if have > self.size and not forget:
            raise MirrorStoreError(
                f"mirror {path} has {have} bytes but --size asks for {self.size}; "
                "start with --forget to wipe it"
            )
        if forget:
            os.ftruncate(fd, 0)  # a wiped mirror holds nothing; holes read as zeros
        if forget or have < self.size:
            os.ftruncate(fd, self.size)
        return missing or forget or have == 0

    def _precheck_meta(self) -> None:
        try:
            with open(self.meta_path, "rb") as meta:
                raw = meta.read(META_HEADER.size)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise MirrorStoreError(f"cannot read {self.meta_path}: {exc.strerror}") from None
        if len(raw) == META_HEADER.size:
            magic, _, _, page_count = META_HEADER.unpack(raw)
            if magic == MAGIC and page_count != self.page_count:
                self._refuse_meta(
                    f"is for {page_count} pages but --size asks for {self.page_count} pages"
                )

    def _open_meta(self, meta_path: Path, *, reset: bool) -> None:
        nbytes = bitmap_nbytes(self.page_count)
        file_size = META_HEADER_BYTES + _align(nbytes)
        try:
            self._meta_fd = os.open(meta_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise MirrorStoreError(f"cannot open {meta_path}: {exc.strerror}") from None
        try:
            have = os.fstat(self._meta_fd).st_size
            fresh = reset or have == 0
            if not fresh:
                self._check_meta(have, file_size)
            else:
                os.ftruncate(self._meta_fd, 0)
                os.ftruncate(self._meta_fd, file_size)
            self._meta = mmap.mmap(self._meta_fd, file_size, mmap.MAP_SHARED)
        except BaseException:
            os.close(self._meta_fd)
            raise
        self._bitmap: npt.NDArray[np.uint8] = np.ndarray(
            (nbytes,), dtype=np.uint8, buffer=self._meta, offset=META_HEADER_BYTES
        )
        if fresh:
            # The magic goes in last and is synced: a bitmap killed during creation is
            # recognised as unusable rather than trusted.
            self._meta.flush()
            self._meta[: META_HEADER.size] = META_HEADER.pack(
                MAGIC, FORMAT_VERSION, PAGE_SIZE, self.page_count
            )
            self._meta.flush()
        self.unreplicated_pages = int(_POPCOUNT[self._bitmap].sum(dtype=np.int64))

    def _check_meta(self, have: int, file_size: int) -> None:
        raw = os.pread(self._meta_fd, META_HEADER.size, 0)
        if len(raw) < META_HEADER.size:
            self._refuse_meta("is too short to be a mirror bitmap")
        magic, fmt, page_size, page_count = META_HEADER.unpack(raw)
        if magic != MAGIC or fmt != FORMAT_VERSION or page_size != PAGE_SIZE:
            self._refuse_meta("is not a remem mirror bitmap of this format")
        if page_count != self.page_count:
            self._refuse_meta(
                f"is for {page_count} pages but --size asks for {self.page_count} pages"
            )
        if have != file_size:
            self._refuse_meta("has the wrong size")

    def _refuse_meta(self, why: str) -> None:
        raise MirrorStoreError(f"bitmap {self.meta_path} {why}; start with --forget to wipe it")

    # -- data ------------------------------------------------------------------------------

    def write_run(self, first: int, chunks: Sequence[Buffer]) -> int:
        """Write adjacent chunks of whole pages from page `first` in one syscall.

        Args:
            first: the first page of the run.
            chunks: buffers of whole pages, back to back on the device, together at most
                MAX_RUN_PAGES pages.

        Returns:
            Bytes written.

        Raises:
            OSError: the device failed the write.
        """
        offset = first * PAGE_SIZE
        if self.direct_io:
            # One copy into the aligned staging buffer (received frames are not aligned).
            end = 0
            for chunk in chunks:
                view = memoryview(chunk).cast("B")
                self._staging_view[end : end + view.nbytes] = view
                end += view.nbytes
            self._write_all([self._staging_view[:end]], offset, end)
            return end
        views = [memoryview(chunk).cast("B") for chunk in chunks]
        total = sum(view.nbytes for view in views)
        self._write_all(views, offset, total)
        # Write-behind means written once and rarely read: keep it out of the page cache.
        os.posix_fadvise(self._fd, offset, total, os.POSIX_FADV_DONTNEED)
        return total

    def write_pages(
        self, chunks: Sequence[Buffer], runs: Sequence[tuple[int, int]]
    ) -> tuple[int, list[tuple[int, int, OSError]]]:
        """Write runs of pages: run k is `runs[k] = (first, count)`, `count` pages from page
        `first`; the runs' pages are the chunks' pages back to back (each chunk whole pages,
        none more than MAX_RUN_PAGES). A later run writing a page an earlier one wrote wins.

        The chunks are copied into the staging buffer (one copy each, as many as it holds at
        a time), runs adjacent on the device there become one write, and the writes go out
        together: one io_submit with O_DIRECT and Linux AIO, unless two overlap (their order
        would then be the device's), else one pwrite each.

        Returns:
            The writes issued, and the failures: (index of the first page among the
            chunks' pages, pages, error) each.
        """
        sizes = [memoryview(chunk).nbytes // PAGE_SIZE for chunk in chunks]
        failures: list[tuple[int, int, OSError]] = []
        issued = 0
        done_chunks = done_runs = done_pages = 0
        while done_chunks < len(chunks):
            # A wave: the chunks the staging buffer holds, and the runs in them.
            end = done_chunks
            pages = 0
            while end < len(chunks) and (end == done_chunks or pages + sizes[end] <= MAX_RUN_PAGES):
                pages += sizes[end]
                end += 1
            stop, taken = done_runs, 0
            while taken < pages:
                taken += runs[stop][1]
                stop += 1
            self._stage(chunks[done_chunks:end])
            issued += self._write_wave(runs[done_runs:stop], done_pages, failures)
            done_chunks, done_runs, done_pages = end, stop, done_pages + pages
        return issued, failures

    def _stage(self, chunks: Sequence[Buffer]) -> None:
        staging = self._staging_view
        end = 0
        for chunk in chunks:
            view = memoryview(chunk).cast("B")
            staging[end : end + view.nbytes] = view
            end += view.nbytes

    def _write_wave(
        self,
        runs: Sequence[tuple[int, int]],
        base: int,
        failures: list[tuple[int, int, OSError]],
    ) -> int:
        """Write the staged runs; returns how many writes (adjacent runs merged) it issued."""
        # Plain Python, not numpy: a group holds a few runs, often one, and numpy's call
        # overhead then costs more than the loop.
        firsts: list[int] = []
        counts: list[int] = []
        ats: list[int] = []  # where each write's pages are staged (page index)
        at, end = 0, -1
        for first, count in runs:
            if first == end:
                counts[-1] += count
            else:
                firsts.append(first)
                counts.append(count)
                ats.append(at)
            at += count
            end = first + count
        aio = self._aio
        again: Sequence[int] = range(len(firsts))  # one pwrite each, in order
        if aio is not None and 1 < len(firsts) <= aio.capacity and not _overlap(firsts, counts):
            sizes = [count * PAGE_SIZE for count in counts]
            address = self._staging_address
            results = aio.pwrite(
                [address + at * PAGE_SIZE for at in ats],
                sizes,
                [first * PAGE_SIZE for first in firsts],
            )
            # A write refused, failed or short: written again alone, which raises the
            # device's error if it fails again (none in the batch overlaps it).
            again = [
                k for k, (got, size) in enumerate(zip(results, sizes, strict=True)) if got != size
            ]
        for k in again:
            try:
                self._write_staged(ats[k], counts[k], firsts[k])
            except OSError as exc:
                failures.append((base + ats[k], counts[k], exc))
        return len(firsts)

    def _write_staged(self, at: int, pages: int, first: int) -> None:
        """pwrite `pages` staged pages from staging page `at` to page `first`."""
        offset, size = first * PAGE_SIZE, pages * PAGE_SIZE
        self._write_all([self._staging_view[at * PAGE_SIZE : at * PAGE_SIZE + size]], offset, size)
        if not self.direct_io:
            # Write-behind means written once and rarely read: keep it out of the page cache.
            os.posix_fadvise(self._fd, offset, size, os.POSIX_FADV_DONTNEED)

    def write_runs(self, writes: Sequence[tuple[int, int, Buffer]]) -> int:
        """Write `(first, count, data)` in order, adjacent ones coalesced; returns syscalls."""
        firsts = [first for first, _, _ in writes]
        counts = [count for _, count, _ in writes]
        starts = plan_runs(firsts, counts, MAX_RUN_PAGES)
        for k, start in enumerate(starts):
            stop = starts[k + 1] if k + 1 < len(starts) else len(writes)
            self.write_run(firsts[start], [data for _, _, data in writes[start:stop]])
        return len(starts)

    def _write_all(self, views: list[memoryview], offset: int, total: int) -> None:
        done = os.pwritev(self._fd, views, offset)
        if done == total:
            return
        # A short write (rare: a full file system, a signal): finish the rest or fail.
        flat = views[0] if len(views) == 1 else memoryview(b"".join(views))
        while done < total:
            wrote = os.pwrite(self._fd, flat[done:], offset + done)
            if wrote <= 0:
                raise OSError(errno.EIO, f"no progress writing at byte {offset + done}")
            done += wrote

    def read(self, first: int, count: int) -> bytes:
        """`count` pages from `first` (zeros where nothing was written), count <= 256.

        Raises:
            OSError: the device failed the read.
        """
        nbytes = count * PAGE_SIZE
        view = self._read_view[:nbytes]
        got = os.preadv(self._fd, [view], first * PAGE_SIZE)
        if got < nbytes:  # past the end of a truncated file: the rest is zeros
            view[got:] = self._zeros_view[: nbytes - got]
        return bytes(view)

    def trim(self, first: int, count: int) -> None:
        """Make `count` pages from `first` read as zeros, freeing their blocks if possible.

        Also clears their unreplicated bits (a trimmed page holds nothing to resync).

        Raises:
            OSError: the device failed.
        """
        offset, length = first * PAGE_SIZE, count * PAGE_SIZE
        if self._punch_holes:
            assert _FALLOCATE is not None
            mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
            if _FALLOCATE(self._fd, mode, offset, length) == 0:
                self.clear_unreplicated(first, count)
                return
            err = ctypes.get_errno()
            if err not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV):
                raise OSError(err, os.strerror(err))
            # This file system (or device) cannot punch holes: write zeros from now on.
            self._punch_holes = False
        end = offset + length
        step = ZERO_PAGES * PAGE_SIZE
        while offset < end:
            chunk = min(step, end - offset)
            self._write_all([self._zeros_view[:chunk]], offset, chunk)
            offset += chunk
        self.clear_unreplicated(first, count)

    def fdatasync(self) -> float:
        """Flush the device's write cache and the bitmap; returns the seconds it took."""
        started = time.perf_counter()
        os.fdatasync(self._fd)
        self._meta.flush()
        seconds = time.perf_counter() - started
        self.fdatasync_seconds += seconds
        return seconds

    # -- unreplicated bitmap ---------------------------------------------------------------

    def set_unreplicated(self, first: int, count: int) -> int:
        """Mark pages as held by the mirror only; returns how many bits changed.

        Call `sync_bitmap` before acknowledging the write these bits guard.
        """
        return self._apply(first, count, set_bits=True)

    def clear_unreplicated(self, first: int, count: int) -> int:
        """The pages are replicated (or trimmed); returns how many bits changed."""
        return self._apply(first, count, set_bits=False)

    def sync_bitmap(self) -> None:
        """msync the bitmap so its bits survive a crash of the host."""
        self._meta.flush()

    def unreplicated(self) -> npt.NDArray[np.bool_]:
        """One bool per page: held by the mirror only."""
        bits = np.unpackbits(self._bitmap, bitorder="little")[: self.page_count]
        return bits.astype(np.bool_)

    # -- client sessions -------------------------------------------------------------------

    @property
    def clean(self) -> bool:
        """The last client session ended cleanly and no session is open."""
        return bool(CLEAN.unpack_from(self._meta, META_HEADER.size)[0] == 1)

    def open_session(self) -> bool:
        """A client attaches: returns whether the mirror was clean, then records a session
        as open, durably, so that a crash of the client or of the mirror from now on leaves
        it not clean."""
        was_clean = self.clean
        CLEAN.pack_into(self._meta, META_HEADER.size, 0)
        self._meta.flush()
        return was_clean

    def close_session(self) -> None:
        """The client detaches cleanly, every write it sent applied: sync them, then record
        the mirror as clean (the data is on disk before the mark that vouches for it)."""
        self.fdatasync()
        CLEAN.pack_into(self._meta, META_HEADER.size, 1)
        self._meta.flush()

    def bitmap_bytes(self) -> bytes:
        """The bitmap as `list_unreplicated_reply` sends it (ceil(page_count / 8) bytes)."""
        return self._bitmap.tobytes()

    def _apply(self, first: int, count: int, *, set_bits: bool) -> int:
        end = first + count
        assert 0 <= first < end <= self.page_count
        lo, hi = first >> 3, (end - 1) >> 3
        span = self._bitmap[lo : hi + 1]
        before = int(_POPCOUNT[span].sum(dtype=np.int64))
        lo_mask = (0xFF << (first & 7)) & 0xFF
        hi_mask = 0xFF >> (7 - ((end - 1) & 7))
        if lo == hi:
            self._mask(lo, lo_mask & hi_mask, set_bits)
        else:
            self._mask(lo, lo_mask, set_bits)
            self._bitmap[lo + 1 : hi] = 0xFF if set_bits else 0
            self._mask(hi, hi_mask, set_bits)
        after = int(_POPCOUNT[span].sum(dtype=np.int64))
        self.unreplicated_pages += after - before
        return abs(after - before)

    def _mask(self, index: int, mask: int, set_bits: bool) -> None:
        value = int(self._bitmap[index])
        self._bitmap[index] = (value | mask) if set_bits else (value & ~mask & 0xFF)

    # -- closing ---------------------------------------------------------------------------

    def close(self) -> None:
        """Sync and close everything (idempotent)."""
        if self._fd < 0:
            return
        try:
            os.fdatasync(self._fd)
            self._meta.flush()
        finally:
            if self._aio is not None:
                self._aio.close()
            del self._bitmap
            self._staging_view.release()
            self._read_view.release()
            self._zeros_view.release()
            for buffer in (self._staging, self._read_buffer, self._zeros, self._meta):
                buffer.close()
            os.close(self._meta_fd)
            os.close(self._fd)
            self._fd = self._meta_fd = -1

"""Replica reads: pages read from a slab's replicas, failing over, authenticated.

A read goes to one replica (spread over a slab's replicas by slab number) and fails over,
page by page, on an error, timeout, missing page or checksum mismatch; the kernel sees an
error only when no copy is left. With a `sealing.PageSealer` every page read is
authenticated and decrypted after its checksum check; a page that fails authentication
(altered, or served for another address) counts as a failure of that replica for that page,
like a checksum mismatch. A replica that served pages damaged gets the good copies written
back (`repair`).

Two ways in: `read_fast`, small runs of written pages of one slab in plain Python (numpy's
per-call cost dominates a 4 KiB read), which gives up to the general path on anything
unusual; and `read_pages`, the general path, which decides everything. `fetch_sealed` and
`open_sealed` serve read-ahead (`readahead.SealedPages`).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import struct
from typing import Any

import crc32c
import numpy as np
import numpy.typing as npt
from remem_common.protocol.pages import PAGE_SIZE, SEAL_BYTES, SLAB_PAGES, PageArray, checksum_pages

from remem_client.backend import BackendError
from remem_client.remote.core import Core, Part
from remem_client.remote.linkpool import FAST_PAGES, GetResult, ReplicaFailure, page_keys, run_keys
from remem_client.remote.pagemap import BoolArray, slab_segments
from remem_client.remote.repair import Damaged, ReadRepair
from remem_client.sealing import PageSealer

log = logging.getLogger("client.remote")
_CRCS = [struct.Struct(f"<{n}I") for n in range(FAST_PAGES + 1)]
_ONES = [b"\x01" * n for n in range(FAST_PAGES + 1)]


def _whole_run(
    result: GetResult, start: int, count: int, *, sealed: bool
) -> tuple[Any, Any] | None:
    """Rows [start, start + count) of a GET reply (pages, seals), if every page was found
    and matches its checksum; None otherwise.

    `sealed`: the caller authenticates every page (AES-GCM) before using it, which catches
    whatever a checksum would, so small runs skip the checksums (~1 us a page)."""
    data = result.data_raw[start * PAGE_SIZE : (start + count) * PAGE_SIZE]
    if count <= FAST_PAGES:
        if result.found_raw[start : start + count] != _ONES[count]:
            return None
        if not sealed:
            crcs = _CRCS[count].unpack_from(result.crc_raw, 4 * start)
            for index in range(count):  # plain Python: numpy's per-call cost dominates here
                page = data[index * PAGE_SIZE : (index + 1) * PAGE_SIZE]
                if crc32c.crc32c(page) != crcs[index]:
                    return None
    else:
        if not result.found[start : start + count].all():
            return None
        rows = result.data[start : start + count]
        if not np.array_equal(checksum_pages(rows), result.crcs[start : start + count]):
            return None
    return data, result.seal_raw[start * SEAL_BYTES : (start + count) * SEAL_BYTES]


class ReplicaReads(Part):
    """Reads of written pages from the replicas."""

    def __init__(self, core: Core, *, repair: ReadRepair, sealer: PageSealer | None) -> None:
        super().__init__(core)
        self._repair = repair
        self._sealer = sealer

    # -- the fast path ---------------------------------------------------------------------

    async def read_fast(self, first: int, count: int, slab: int) -> memoryview | None:
        """Small reads within one slab in plain Python (numpy's per-call cost dominates a
        4 KiB read). None when the general path must decide: some pages written and some
        not, a replica failing, or a checksum mismatch.

        In two halves, `start_fast` and `finish_fast`, for a caller that waits for the
        batch itself (`RemoteBackend.start_read`: no coroutine per read)."""
        started = self.start_fast(first, count, slab)
        if not isinstance(started, tuple):
            return started
        future, start = started
        try:
            result = await future
        except ReplicaFailure:
            return None  # the general path fails over and reports
        return self.finish_fast(result, start, first, count)

    def start_fast(
        self, first: int, count: int, slab: int
    ) -> memoryview | tuple[asyncio.Future[GetResult], int] | None:
        """`read_fast` up to its wait: the pages (never written: zeros), or the batch to
        wait for and this read's first row in it, or None (the general path decides)."""
        bits = self._pages.written_bits(first, count)
        if bits == 0:
            self._stats.pages_read_zero += count
            return memoryview(bytes(count * PAGE_SIZE))
        replicas = self._slabs.replicas[slab]
        if bits != (1 << count) - 1 or replicas is None:
            return None
        live = self._slabs.readable(slab, replicas)
        if not live:
            return None
        links = self._links
        link = links.link(live[slab % len(live)])
        if not link.gathering("get"):
            # Another replica already gathering a GET now takes the read too: one
            # message of many pages costs far less than one per server (a ZeroMQ message
            # costs tens of microseconds of CPU on each side), and the turns rotate over
            # the replicas by slab, which still spreads the load.
            for other in live:
                other_link = links.get(other.server_id)
                if other_link is not None and other_link.gathering("get"):
                    link = other_link
                    break
        try:
            return link.submit_get(run_keys(first, count), first, first + count - 1)
        except ReplicaFailure:
            return None  # the general path fails over and reports

    def finish_fast(
        self, result: GetResult, start: int, first: int, count: int
    ) -> memoryview | None:
        """`read_fast` once its batch is answered (rows from `start` on)."""
        whole = _whole_run(result, start, count, sealed=self._sealer is not None)
        # None: the general path fails over, counts and reports.
        return None if whole is None else self.open_sealed(first, count, *whole)

    def open_sealed(self, first: int, count: int, data: Any, seals: Any) -> memoryview | None:
        """Plaintext of pages [first, first + count) of one slab, or None if one fails
        authentication (the caller's usual path counts and reports it)."""
        if self._sealer is not None:
            slab = first // SLAB_PAGES
            page = first - slab * SLAB_PAGES
            plain = bytearray(count * PAGE_SIZE)
            if self._sealer.open_into(slab, range(page, page + count), data, seals, plain):
                return None
            data = plain
        self._stats.pages_read_remote += count
        return memoryview(data)

    # -- read-ahead's source ---------------------------------------------------------------

    def written_prefix(self, first: int, count: int) -> int:
        """How many pages from `first` on (of at most `count`) are marked written."""
        bits = self._pages.written_bits(first, count)
        return ((bits ^ (bits + 1)) >> 1).bit_length()  # leading pages set

    async def fetch_sealed(self, first: int, count: int) -> tuple[Any, Any]:
        """Pages [first, first + count) of one slab as a replica holds them, with their
        seals, if every one comes back found and checksummed; else (None, None)."""
        slab = first // SLAB_PAGES
        replicas = self._slabs.replicas[slab]
        pages = self._pages
        if replicas is None or pages.unknown[slab] or pages.any_unreplicated(first, count):
            return None, None  # unknown pages, or newest on the mirror: the usual path knows
        live = self._slabs.readable(slab, replicas)
        if not live:
            return None, None
        replica = live[(slab + first // count) % len(live)]  # windows alternate replicas
        try:
            future, start = self._links.link(replica).submit_get(
                page_keys(first, count, SLAB_PAGES), first, first + count - 1
            )
            result = await future
        except ReplicaFailure:
            return None, None
        whole = _whole_run(result, start, count, sealed=self._sealer is not None)
        if whole is None:
            return None, None
        data, seals = whole
        return (
            np.frombuffer(data, dtype=np.uint8).reshape(count, PAGE_SIZE),
            np.frombuffer(seals, dtype=np.uint8).reshape(count, SEAL_BYTES),
        )

    # -- the general path ------------------------------------------------------------------

    async def read_pages(self, first: int, count: int) -> PageArray:
        """Pages [first, first + count) as a (count, 4096) array the caller may keep."""
        written = self._pages.maybe_written(first, count)
        if not written.any():
            self._stats.pages_read_zero += count
            return np.zeros((count, PAGE_SIZE), dtype=np.uint8)
        out: PageArray | None = None
        for seg_first, seg_count in slab_segments(first, count):
            offset = seg_first - first
            mask = written[offset : offset + seg_count]
            if not mask.any():
                continue
            rows = await self._read_segment(seg_first, seg_count, mask)
            if out is None and seg_count == count and mask.all():
                return rows  # one slab, all pages written: the reply's array is ours
            if out is None:
                out = np.zeros((count, PAGE_SIZE), dtype=np.uint8)
            out[offset : offset + seg_count][mask] = rows
        self._stats.pages_read_zero += int(count - written.sum())
        assert out is not None
        return out

    async def _read_segment(self, first: int, count: int, mask: BoolArray) -> PageArray:
        """The written pages (where `mask`) of one slab's run of pages, failing over."""
        slab = first // SLAB_PAGES
        replicas = self._slabs.replicas[slab]
        if replicas is None:
            raise BackendError(errno.EIO, f"slab {slab} has written pages but no replicas")
        stats = self._stats
        unknown = bool(self._pages.unknown[slab])
        keys = page_keys(first, count, SLAB_PAGES)[mask]
        wanted = keys.shape[0]
        rows = np.empty((wanted, PAGE_SIZE), dtype=np.uint8)
        todo = np.ones(wanted, dtype=np.bool_)
        # Replicas that served some of these pages damaged, for read repair (see
        # ReadRepair.repair), and whether the slab saw no write from the read's start on.
        to_repair: Damaged = []
        repair_rows: PageArray | None = None
        repair_seals = np.zeros((0, SEAL_BYTES), dtype=np.uint8)
        write_mark = self._ordering.slab_write_mark(slab)
        # Replicas that answered, and pages any of them holds (intact or not): only pages
        # that every replica answered for and none holds may read as never written.
        answered = 0
        held = np.zeros(wanted, dtype=np.bool_)
        # Replicas of an adopted slab that lacked pages (not reported unless another holds
        # one of them: see the end of each answer).
        lacking: list[tuple[str, npt.NDArray[np.intp]]] = []
        live = self._slabs.readable(slab, replicas)
        # Spread reads over a slab's replicas: slab n prefers its (n mod k)-th replica.
        if live:
            shift = slab % len(live)
            live = live[shift:] + live[:shift]
        for attempt, replica in enumerate(live):
            sub = keys if todo.all() else keys[todo]
            try:
                future, start = self._links.link(replica).submit_get(sub, first, first + count - 1)
                result = await future
            except ReplicaFailure as failure:
                self._slabs.replica_failed(failure, slab)
                stats.failovers += 1
                continue
            answered += 1
            found = result.found[start : start + sub.shape[0]]
            crcs = result.crcs[start : start + sub.shape[0]]
            data = result.data[start : start + sub.shape[0]]
            good = found.copy()
            if good.all():  # no gathering copy of the pages for the usual case
                good = checksum_pages(data) == crcs
            elif good.any():
                good[good] = checksum_pages(data[good]) == crcs[good]
            cipher = data
            seals = result.seals[start : start + sub.shape[0]]
            if self._sealer is not None:
                data = self._open(slab, sub, data, seals, good)
            if good.all() and todo.all():
                stats.pages_read_remote += wanted
                if lacking:  # nearly always empty: no array made for it
                    self._report_lacking(lacking, held | found, slab)
                return data
            positions = np.flatnonzero(todo)
            held[positions[found]] = True
            rows[positions[good]] = data[good]
            todo[positions[good]] = False
            if to_repair:
                # What this replica serves intact goes back, as it is on the wire (sealed),
                # to the replicas that served it damaged.
                if repair_rows is None:
                    repair_rows = np.empty((wanted, PAGE_SIZE), dtype=np.uint8)
                    repair_seals = np.zeros((wanted, SEAL_BYTES), dtype=np.uint8)
                repair_rows[positions[good]] = cipher[good]
                repair_seals[positions[good]] = seals[good]
            # Pages this replica should hold and does not serve intact: a bad checksum, or
            # missing where the page is known to be written (not in an adopted slab).
            damaged = ~good if not unknown else found & ~good
            if damaged.any():
                to_repair.append((replica, positions[damaged]))
            if not todo.any():
                stats.pages_read_remote += wanted
                self._report_lacking(lacking, held, slab)
                if to_repair and repair_rows is not None:
                    self._repair.repair(
                        slab, first, count, keys, repair_rows, repair_seals, to_repair, write_mark
                    )
                return rows
            if attempt + 1 < len(live):
                stats.failovers += 1
            if not damaged.any():
                # An adopted slab whose replica lacks pages: most likely never written (a
                # restarted client reads such pages every time it starts), no failure to
                # report unless another replica turns out to hold one of them.
                lacking.append((replica.server_id, positions[~found]))
                continue
            log.warning(
                "replica %s lacks or corrupts %d pages of slab %d; failing over",
                replica.server_id,
                int(np.count_nonzero(damaged)),
                slab,
            )
            self._slabs.damaged(replica.server_id, slab)
        self._report_lacking(lacking, held, slab)
        if unknown and answered == len(replicas) and not held[todo].any():
            # Adopted after a restart: every replica answered and none holds these pages, so
            # they were never written (or trimmed). They read as zeros. A replica that did not
            # answer, or a page some replica holds corrupt, is no proof of that: EIO (and the
            # mirror, if any).
            rows[todo] = 0
            return rows
        raise BackendError(
            errno.EIO, f"{int(todo.sum())} pages of slab {slab} are on no live replica"
        )

    def _report_lacking(
        self, lacking: list[tuple[str, npt.NDArray[np.intp]]], held: BoolArray, slab: int
    ) -> None:
        """Report the replicas that lacked pages another replica holds: they lost them."""
        for server_id, positions in lacking:
            if held[positions].any():
                log.warning("replica %s lacks pages of slab %d another holds", server_id, slab)
                self._slabs.damaged(server_id, slab)

    def _open(
        self, slab: int, keys: Any, cipher: PageArray, seals: PageArray, good: BoolArray
    ) -> PageArray:
        """Decrypt the rows where `good` (checksum matched) into a new array; rows that fail
        authentication are cleared from `good` and counted."""
        assert self._sealer is not None
        plain = np.empty(cipher.shape, dtype=np.uint8)
        if good.all():
            failed = self._sealer.open_into(slab, keys["page"].tolist(), cipher, seals, plain)
            rows = np.asarray(failed, dtype=np.intp)
        elif good.any():
            picked = np.flatnonzero(good)
            opened = np.empty((picked.size, PAGE_SIZE), dtype=np.uint8)
            failed = self._sealer.open_into(
                slab, keys["page"][picked].tolist(), cipher[picked], seals[picked], opened
            )
            plain[picked] = opened
            rows = picked[np.asarray(failed, dtype=np.intp)]
        else:
            return plain
        if rows.size:
            good[rows] = False
            self._stats.auth_failures += int(rows.size)
            log.warning(
                "%d pages of slab %d failed authentication (altered or misplaced ciphertext)",
                rows.size,
                slab,
            )
        return plain

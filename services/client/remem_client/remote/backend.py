"""The remote backend: a `Backend` whose pages are replicated over page servers.

The facade the NBD layer calls. It builds the parts (the package docstring says what each
does and how a write travels through them) and routes each request: reads through
read-ahead, the plain-Python fast path, or the general path with its mirror fallback;
writes, trims and zeroing through the read-ahead filter and write ordering to the mirror
fallback's store. Partial-page writes are read, patched and written whole here.

Reads also begin without a coroutine (`start_read`, which the NBD layer calls): a small
read of written pages waits on its page server batch as a `PendingRead`, and the NBD
layer's callback on that batch finishes it (`PendingRead.finish`), so a 4 KiB read costs
no coroutine; anything unusual carries on as the coroutine `finish` returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from remem_common.protocol.pages import PAGE_SIZE, SLAB_PAGES, PageArray
from remem_common.security import Security

from remem_client.mirror_link import MirrorFailure, MirrorLink
from remem_client.readahead import ReadAhead, ReadAheadFilter
from remem_client.remote.core import Core
from remem_client.remote.fallback import MirrorFallback
from remem_client.remote.linkpool import FAST_PAGES, GetResult, LinkPool, Links, ReplicaFailure
from remem_client.remote.ordering import WriteOrdering
from remem_client.remote.pagemap import PageMap
from remem_client.remote.reads import ReplicaReads
from remem_client.remote.rebuild import MirrorRebuild
from remem_client.remote.repair import ReadRepair
from remem_client.remote.resync import Resync
from remem_client.remote.slabmap import SlabMap, SlabPlacement
from remem_client.remote.stats import RemoteStats
from remem_client.remote.writes import ReplicaWrites
from remem_client.sealing import PageSealer

if TYPE_CHECKING:
    import zmq

    from remem_client.metrics import MalformedReplies

log = logging.getLogger("client.remote")


class RemoteBackend:
    """A `Backend` whose pages are replicated over page servers."""

    # Nearly every request waits on a page server, so a Task per request was a tenth of a
    # 4 KiB read's CPU; nothing here needs a current task (no asyncio.timeout).
    eager = True
    task_free = True
    can_trim = True
    can_fua = True
    can_flush = True
    can_write_zeroes = True
    can_multi_conn = True
    can_fast_zero = True

    def __init__(
        self,
        *,
        size: int,
        tenant: str,
        volume: int,
        placement: SlabPlacement,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        replica_timeout: float,
        on_replica_failure: Callable[[str], None] | None = None,
        sealer: PageSealer | None,
        mirror: MirrorLink | None = None,
        resync_interval: float = 0.5,
        malformed: MalformedReplies | None = None,
        security: Security | None = None,
        read_ahead: ReadAhead | None = None,
        links: Links | None = None,
    ) -> None:
        """Args (besides the device's): `placement` allocates slabs and hears of failures;
        the page server links are `links`, or made over `context` (one of the two);
        `sealer` encrypts pages (None: --no-encrypt-pages); `mirror` is the local mirror;
        `read_ahead` the ring of pages fetched ahead (None: off)."""
        if size % PAGE_SIZE:
            raise ValueError(f"size must be a multiple of {PAGE_SIZE}")
        self._size = size
        self.page_count = size // PAGE_SIZE
        # Read by the metrics collector (`assembly`), with the counters.
        self.malformed = malformed
        self.sealer = sealer
        self.mirror = mirror
        stats = self.stats = RemoteStats()
        pages = self.pages = PageMap(self.page_count)
        self.slab_count = pages.slab_count
        if links is None:
            if context is None:
                raise ValueError("RemoteBackend needs a ZeroMQ context or a link pool")
            links = LinkPool(context, security, tenant, volume, replica_timeout, malformed)
        self._links = links
        # Placement writes the slab map (`placement_link`), not this facade.
        self.slabs = SlabMap(pages, placement, links, stats, on_failure=on_replica_failure)
        self._ordering = WriteOrdering(self.slab_count)
        core = Core(pages, self.slabs, links, self._ordering, stats)
        reads = self._reads = ReplicaReads(core, repair=ReadRepair(core), sealer=sealer)
        writes = ReplicaWrites(core, sealer=sealer)
        self._fallback = MirrorFallback(core, reads=reads, writes=writes, mirror=mirror)
        self._rebuild: MirrorRebuild | None = None
        self._resync: Resync | None = None
        if mirror is not None:
            self._rebuild = MirrorRebuild(core, reads=reads, mirror=mirror)
            self._resync = Resync(
                core,
                fallback=self._fallback,
                writes=writes,
                rebuild=self._rebuild,
                interval=resync_interval,
            )
        self._ahead = ReadAheadFilter(
            reads, page_count=self.page_count, boundary=SLAB_PAGES, ring=read_ahead
        )
        # Run after the links are closed (the placement link, the ZeroMQ context).
        self.on_close: list[Callable[[], Awaitable[None]]] = []

    # -- state -----------------------------------------------------------------------------

    @property
    def read_ahead(self) -> ReadAhead | None:
        """Pages fetched ahead of sequential reads (None: off)."""
        return self._ahead.ring

    @read_ahead.setter
    def read_ahead(self, ring: ReadAhead | None) -> None:
        self._ahead.ring = ring

    @property
    def unreplicated_pages(self) -> int:
        return self.pages.unreplicated_pages

    @property
    def network_down(self) -> bool:
        """The last replica write failed and went to the mirror alone."""
        return self._fallback.network_down

    @property
    def mode(self) -> str:
        """normal, network_down (writes go to the mirror alone) or resyncing."""
        if not self.pages.unreplicated_pages:
            return "normal"
        return "network_down" if self._fallback.network_down else "resyncing"

    @property
    def _rebuilding(self) -> tuple[int, int] | None:
        """The run [first, end) a mirror rebuild is copying (tests aim their writes at it)."""
        run = self._ordering.watching
        return None if run is None else (run.first, run.end)

    def metadata_bytes(self) -> int:
        """Client memory spent on location metadata (bitmaps + slab map)."""
        return self.pages.nbytes() + self.slabs.nbytes()

    def mark_unreplicated(self, bitmap: bytes) -> int:
        """Adopt the mirror's list of mirror-only pages (a restarted client); returns how many.

        They are marked written too, and the resync task copies them to their replicas."""
        return self.pages.adopt_unreplicated(bitmap)

    def written_anywhere(self) -> bool:
        """Some page may be written (marked, or in a slab adopted with unknown contents)."""
        return self.pages.written_anywhere()

    def written_pages(self) -> int:
        return self.pages.written_pages()

    # -- Backend interface -----------------------------------------------------------------

    def size(self) -> int:
        return self._size

    async def pread(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        started = self.start_read(offset, length)
        if started is None:  # the read-ahead ring may serve it
            first, count, skip = _page_span(offset, length)
            ahead = self._ahead
            plain = ahead.lookup(first, count)
            if plain is None and (fetching := ahead.pending(first, count)) is not None:
                await asyncio.wait((fetching,))  # not `await`: cancelling us must not cancel it
                plain = ahead.lookup(first, count, waited=True)
            ahead.follow(first, count)
            if plain is not None:
                return plain[skip : skip + length]
            started = self._start_remote(first, count, skip, length)
        if isinstance(started, PendingRead):
            # A failure is `finish`'s to see: it takes the general path, which fails over.
            with contextlib.suppress(ReplicaFailure):
                await started.future
            started = started.finish(started.future)
        data: bytes | bytearray | memoryview = (
            await started if asyncio.iscoroutine(started) else started
        )
        return data

    def start_read(self, offset: int, length: int) -> Any:
        """`pread` begun without a coroutine, for the NBD layer's hot path. Gives the bytes;
        a `PendingRead`, waiting on a page server batch (its `finish` then gives the bytes,
        or a coroutine that completes the read); a coroutine that completes the read; or
        None, having done nothing: the read-ahead ring may serve it, run `pread`."""
        first = offset // PAGE_SIZE
        count = (offset + length - 1) // PAGE_SIZE - first + 1
        ahead = self._ahead
        if ahead.ring is not None:
            if ahead.may_serve(first, count):
                return None
            ahead.follow(first, count)
        return self._start_remote(first, count, offset - first * PAGE_SIZE, length)

    def _start_remote(self, first: int, count: int, skip: int, length: int) -> Any:
        """A read the ring does not serve: the plain-Python fast path where it can (its
        batch, or zeros), else the general path (a coroutine)."""
        slab = first // SLAB_PAGES
        pages = self.pages
        if (
            count <= FAST_PAGES
            and (first + count - 1) // SLAB_PAGES == slab
            and not pages.unknown[slab]
            and not pages.any_unreplicated(first, count)
        ):
            fast = self._reads.start_fast(first, count, slab)
            if isinstance(fast, tuple):
                future, start = fast
                return PendingRead(self, future, start, first, count, skip, length)
            if fast is not None:
                return fast[skip : skip + length]
        return self._read_general(first, count, skip, length)

    async def _read_general(self, first: int, count: int, skip: int, length: int) -> memoryview:
        rows = await self._fallback.load(first, count)
        return memoryview(rows.data).cast("B")[skip : skip + length]

    async def pwrite(self, offset: int, data: memoryview, fua: bool) -> None:
        await self._ahead.changing(offset, len(data), self._pwrite(offset, data))

    async def _pwrite(self, offset: int, data: memoryview) -> None:
        end = offset + len(data)
        if offset % PAGE_SIZE == 0 and end % PAGE_SIZE == 0:
            pages = np.frombuffer(data, dtype=np.uint8).reshape(-1, PAGE_SIZE)
            first = offset // PAGE_SIZE
            # `async with` the entry, without its two coroutines (most of a swap write's
            # layers): whole-page writes with no partial write in flight skip the scan.
            ordering = self._ordering
            entry = ordering.write(first, first + pages.shape[0] - 1)
            try:
                if ordering.partial_writes:
                    await ordering.wait_earlier(entry)
                await self._fallback.store(first, pages)
            finally:
                ordering.end(entry)
            return
        await self._read_modify_write(offset, end, lambda buf, skip: _patch(buf, skip, data))

    async def _read_modify_write(
        self, offset: int, end: int, patch: Callable[[PageArray, int], None]
    ) -> None:
        """Write a range that does not start and end on page boundaries: read back its
        edge pages, patch them and write them whole (`WriteOrdering` keeps any earlier
        change of an edge from landing in between)."""
        first = offset // PAGE_SIZE
        last = (end - 1) // PAGE_SIZE
        async with self._ordering.write(first, last, tuple(sorted({first, last}))):
            pages = (await self._fallback.load(first, last - first + 1)).copy()
            patch(pages, offset - first * PAGE_SIZE)
            await self._fallback.store(first, pages)

    async def flush(self) -> None:
        # A write completes only once every live replica acknowledged it: there is nothing
        # left to flush.
        return None

    async def trim(self, offset: int, length: int) -> None:
        await self._ahead.changing(offset, length, self._free_whole_pages(offset, length))

    async def zero(self, offset: int, length: int, may_trim: bool) -> None:
        await self._ahead.changing(offset, length, self._zero(offset, length))

    async def _zero(self, offset: int, length: int) -> None:
        end = offset + length
        first_full = -(-offset // PAGE_SIZE) * PAGE_SIZE
        last_full = end // PAGE_SIZE * PAGE_SIZE
        if first_full < last_full:
            # A page that is not marked written reads as zeros: freeing whole pages is zeroing
            # them, with or without NBD_CMD_FLAG_NO_HOLE.
            await self._free_whole_pages(first_full, last_full - first_full)
        for edge_start, edge_end in _partial_edges(offset, end, first_full, last_full):
            length = edge_end - edge_start
            await self._read_modify_write(edge_start, edge_end, functools.partial(_zero, n=length))

    async def _free_whole_pages(self, offset: int, length: int) -> None:
        first = -(-offset // PAGE_SIZE)
        end_page = (offset + length) // PAGE_SIZE
        if end_page <= first:
            return
        async with self._ordering.write(first, end_page - 1):
            await self._fallback.free_pages(first, end_page - first)

    # -- the mirror ------------------------------------------------------------------------

    def start_resync(self) -> None:
        """Start the task that copies mirror-only pages to their replicas."""
        if self._resync is not None:
            self._resync.start()

    async def resync_once(self) -> int:
        """Copy every mirror-only page to its replicas; returns pages copied this round."""
        return 0 if self._resync is None else await self._resync.once()

    async def rebuild_mirror(self) -> bool:
        """Copy the device from the replicas to a mirror that may have missed writes, then
        trust it again; returns whether it is complete (see `rebuild`)."""
        assert self._rebuild is not None
        return await self._rebuild.rebuild()

    async def close(self) -> None:
        if self._resync is not None:
            self._resync.stop()
        self._ahead.close()
        if self.mirror is not None:
            try:
                if await self.mirror.detach():
                    log.info("mirror detached: it holds every write")
                else:
                    log.warning("mirror left incomplete: the next start rebuilds it")
            except MirrorFailure as exc:
                log.warning(
                    "mirror did not confirm the detach (%s): the next start rebuilds it", exc
                )
            self.mirror.close()
        self._links.close()
        for closer in self.on_close:
            await closer()
        if self.sealer is not None:
            self.sealer.close()


@dataclass(slots=True, eq=False)
class PendingRead:
    """A fast-path read waiting on the page server batch it joined (`start_read`)."""

    backend: RemoteBackend
    future: asyncio.Future[GetResult]
    start: int  # this read's first row in the batch's answer
    first: int
    count: int
    skip: int  # bytes into the first page where the read starts
    length: int

    def finish(self, future: asyncio.Future[GetResult]) -> Any:
        """Once `future` (the batch) is done: the bytes, or the general path's coroutine
        (a replica failing, a page missing or damaged: it fails over and reports)."""
        backend = self.backend
        try:
            result = future.result()
        except ReplicaFailure:
            plain = None
        else:
            plain = backend._reads.finish_fast(result, self.start, self.first, self.count)
        if plain is None:
            return backend._read_general(self.first, self.count, self.skip, self.length)
        return plain[self.skip : self.skip + self.length]


def _page_span(offset: int, length: int) -> tuple[int, int, int]:
    """(first page, page count, bytes into the first page) of a byte range."""
    first = offset // PAGE_SIZE
    return first, (offset + length - 1) // PAGE_SIZE - first + 1, offset - first * PAGE_SIZE


def _partial_edges(offset: int, end: int, first_full: int, last_full: int) -> list[tuple[int, int]]:
    """Byte ranges of a request that lie in partially covered pages."""
    if first_full >= last_full:
        return [(offset, end)]
    edges = []
    if offset < first_full:
        edges.append((offset, first_full))
    if last_full < end:
        edges.append((last_full, end))
    return edges


def _patch(pages: PageArray, skip: int, data: memoryview) -> None:
    flat = pages.reshape(-1)
    flat[skip : skip + len(data)] = np.frombuffer(data, dtype=np.uint8)


def _zero(pages: PageArray, skip: int, n: int) -> None:
    pages.reshape(-1)[skip : skip + n] = 0

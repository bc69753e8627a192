"""The remote backend: the device's pages live on k page servers, placed by placement.

State kept on the client is small and flat: one bit per device page saying whether it was
ever written (a page never written reads as zeros without network traffic), and per slab the
ids of its replicas. That is 32 KiB per GiB of device for the bits plus a few bytes per
64 MiB slab, against the seed's per-page bitfield.

Writes go to every live replica of the slab at once, batched with other requests of the same
loop turn, and complete when all of them acknowledged; a replica that fails is dropped from
use, reported to placement, and the write completes on the rest (at least one replica, not
just a push target, must store it). A replica that missed a write another replica stored
(it failed it, timed out, or was skipped while backing off) holds a stale copy even once it
answers again: it is not read for that slab any more and is reported to placement with
`missed_write`, which replaces it. Reads go to one replica (spread over a slab's replicas by
slab number) and fail over, page by page, on an error, timeout, missing page or checksum
mismatch. The kernel sees an error only when no copy is left. A replica that served a page
corrupt (or lacked a page known to be written) gets the good copy written back in the
background (read repair, see `_read_repair`).

With a `sealing.PageSealer` (the default of `remem client`), pages are encrypted once per
write, before the copies go out, and every page read is authenticated and decrypted after
its checksum check; a page that fails authentication (altered, or served for another
address) counts as a failure of that replica for that page, like a checksum mismatch, and
is read from the next replica, then the mirror. The mirror is on this host and holds
plaintext.

With a local mirror (`mirror_link.MirrorLink`), every write is also queued to the mirror
(write-behind, bounded cache). When no replica can store a write (network down), it goes
to the mirror alone, durably, and its pages are marked in a second bitmap, `unreplicated`
(another 32 KiB per GiB, allocated at the first such write and freed once every page is
resynced, so a healthy client spends nothing on it); such pages are read from the mirror
until the resync task has copied them to their replicas. A read no replica can serve also
falls back to the mirror, if the mirror is known to hold every write; one that may have
missed writes (a session that did not end cleanly, a timeout) is rebuilt from the replicas
by the same task first (`rebuild_mirror`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import itertools
import logging
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

import crc32c
import numpy as np
import zmq
from remem_common.protocol.client_mirror import MAX_MIRROR_PAGES
from remem_common.protocol.pages import (
    MAX_BATCH_PAGES,
    PAGE_SIZE,
    SEAL_BYTES,
    SLAB_PAGES,
    KeyArray,
    PageArray,
    U32Array,
    checksum_pages,
)
from remem_common.security import Security

from remem_client.backend import BackendError
from remem_client.links import GetResult, PageServerLink, ReplicaFailure, page_keys
from remem_client.metrics import MalformedReplies
from remem_client.mirror_link import MirrorFailure, MirrorLink, consume_outcome
from remem_client.readahead import Fetch, ReadAhead
from remem_client.sealing import PageSealer, SealingError

log = logging.getLogger("client.remote")
# Times a mirror rebuild reads a run again, or waits, because writes of it were in flight,
# before the round gives up (the next one resumes there).
REBUILD_REREADS = 50
# Reads of up to this many pages within one slab take the plain-Python fast path.
FAST_PAGES = 64
_PAIRS = [struct.Struct(f"<{2 * n}I") for n in range(FAST_PAGES + 1)]
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


def _interleave(slab: int, page: int, count: int) -> list[int]:
    """[slab, page, slab, page + 1, ...]: the key pairs of `count` consecutive pages."""
    out = [slab] * (2 * count)
    out[1::2] = range(page, page + count)
    return out


# Seconds a replica that failed a request is left alone before it is tried again (unless
# placement's map drops it first).
FAILURE_BACKOFF = 5.0
# Pages of read repair in flight at most (16 MiB): past it, repairs are skipped (counted).
REPAIR_PAGES_MAX = 4096


@dataclass(frozen=True)
class Replica:
    """A page server holding a slab."""

    server_id: str
    endpoint: str
    public_key: str | None = None  # the page server's Curve key (from placement)


class SlabPlacement(Protocol):
    """What the backend needs of placement (implemented by the placement client)."""

    async def allocate(self, slab: int) -> list[Replica]:
        """The replicas of `slab`, allocating them on first use."""
        ...

    def report_failure(
        self, server_id: str, slab: int, detail: str, *, missed_write: bool = False
    ) -> None:
        """Tell placement a replica failed a request (fire and forget); `missed_write`: it
        did not store a write of the slab that another replica stored (its copy is stale).
        The placement client calls `RemoteBackend.stale_reported` with the reply's epoch."""
        ...


@dataclass
class RemoteStats:
    """Counters the metrics module exports (plain ints: cheap on the hot path)."""

    failovers: int = 0
    replica_failures: int = 0
    pages_read_remote: int = 0
    pages_read_zero: int = 0
    pages_written: int = 0
    pages_read_mirror: int = 0
    pages_written_mirror_only: int = 0
    pages_resynced: int = 0
    resync_failures: int = 0
    # Pages copied from the replicas to a mirror that may have missed writes, and rebuilds
    # that completed (the mirror serves page-ins again).
    pages_rebuilt: int = 0
    mirror_rebuilds: int = 0
    # Pages whose checksum matched but whose AES-GCM tag did not: altered by or on the way
    # from a page server, or served for another address.
    auth_failures: int = 0
    # Pages written back to a replica that served them corrupt or missing (read repair),
    # repairs that failed, and repairs skipped (a write to the slab was in flight, or the
    # bound on repairs in flight was reached).
    read_repairs: int = 0
    missed_writes: int = 0
    read_repairs_failed: int = 0
    read_repairs_skipped: int = 0


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
        context: zmq.Context[zmq.Socket[bytes]],
        replica_timeout: float,
        on_replica_failure: Callable[[str], None] | None = None,
        sealer: PageSealer | None,
        mirror: MirrorLink | None = None,
        resync_interval: float = 0.5,
        malformed: MalformedReplies | None = None,
        security: Security | None = None,
        read_ahead: ReadAhead | None = None,
    ) -> None:
        if size % PAGE_SIZE:
            raise ValueError(f"size must be a multiple of {PAGE_SIZE}")
        self._size = size
        self.tenant = tenant
        self.volume = volume
        self._placement = placement
        self._context = context
        self._security = security or Security.insecure()
        self._timeout = replica_timeout
        self.malformed = malformed
        self._on_failure = on_replica_failure
        self.page_count = size // PAGE_SIZE
        self.slab_count = -(-self.page_count // SLAB_PAGES)
        self._written = np.zeros(-(-self.page_count // 8), dtype=np.uint8)
        self._slab_replicas: list[list[Replica] | None] = [None] * self.slab_count
        # Servers a slab push is filling right now: written to, not yet read from.
        self._slab_filling: list[list[Replica]] = [[] for _ in range(self.slab_count)]
        # Slabs adopted from placement's map at start (a restarted client): which of their
        # pages were written is not known here, so their unmarked pages are looked up on the
        # replicas, and a page no replica holds reads as zeros.
        self._slab_unknown = np.zeros(self.slab_count, dtype=np.bool_)
        self._allocating: dict[int, asyncio.Future[list[Replica]]] = {}
        self._links: dict[str, PageServerLink] = {}
        # server id -> when it failed; skipped for FAILURE_BACKOFF seconds while placement
        # still lists it (a dead one leaves the map and is forgotten then).
        self._failed: dict[str, float] = {}
        # Writes in flight by arrival: [first page, last page, edge pages a partial write
        # reads back, future a later write waits on or None] (see _ordered_write).
        self._writes_in_flight: dict[int, list[Any]] = {}
        self._partial_writes = 0
        self._write_arrivals = itertools.count()
        # Per slab: writes and trims ever started, and those in flight (read repair checks
        # them, see _read_repair); pages of read repair in flight.
        self._slab_writes = [0] * self.slab_count
        self._slab_writing = [0] * self.slab_count
        self._repairing = 0
        # slab -> {server id: [when reported, epoch of placement's reply or None]}: replicas
        # that missed a write of the slab (stale copies). Not read from until placement's
        # map, at or after the reply's epoch, shows what it made of the report.
        self._stale: dict[int, dict[str, list[Any]]] = {}
        self.stats = RemoteStats()
        self.sealer = sealer
        self.mirror = mirror
        # Pages whose newest data only the mirror holds (written while the network was down).
        self._unreplicated: np.ndarray[Any, np.dtype[np.uint8]] | None = None
        self.unreplicated_pages = 0
        # Slabs the resync task is copying right now: writes to them wait (see _resync_run).
        self._resync_busy: set[int] = set()
        self._resync_done = asyncio.Event()
        self._resync_interval = resync_interval
        self._resync_task: asyncio.Task[None] | None = None
        # The run a mirror rebuild is copying: [first, end, a write of it started], set by
        # _ordered_write (see _rebuild_run).
        self._rebuilding: list[Any] | None = None
        # Where the next rebuild round starts, and the mirror's losses it started after.
        self._rebuild_cursor = 0
        self._rebuild_losses = -1
        # The last replica write failed and went to the mirror alone (for the mode metric).
        self.network_down = False
        # Pages fetched ahead of sequential reads (None: off), and the fetches on their way.
        self.read_ahead = read_ahead
        self._fetching: set[asyncio.Task[None]] = set()
        # Run after the links are closed (the placement link, the ZeroMQ context).
        self.on_close: list[Callable[[], Awaitable[None]]] = []

    # -- metadata --------------------------------------------------------------------------

    def metadata_bytes(self) -> int:
        """Client memory spent on location metadata (bitmap + slab map)."""
        slab_entries = sum(len(r) for r in self._slab_replicas if r is not None)
        extra = self._unreplicated.nbytes if self._unreplicated is not None else 0
        bitmaps = self._written.nbytes + extra
        return int(bitmaps) + 8 * self.slab_count + 16 * slab_entries

    def _written_mask(self, first: int, count: int) -> np.ndarray[Any, np.dtype[np.bool_]]:
        return _bits_of(self._written, first, count)

    def _maybe_written(self, first: int, count: int) -> np.ndarray[Any, np.dtype[np.bool_]]:
        """Pages that may hold data: marked written, or in a slab adopted after a restart."""
        written = self._written_mask(first, count)
        if self._slab_unknown.any():
            for seg_first, seg_count in _slab_segments(first, count):
                if self._slab_unknown[seg_first // SLAB_PAGES]:
                    written[seg_first - first : seg_first - first + seg_count] = True
        return written

    def _set_written(self, first: int, count: int, value: bool) -> None:
        _set_bits(self._written, first, count, value)

    def _set_unreplicated(self, first: int, count: int, value: bool) -> None:
        if self._unreplicated is None:
            if not value:
                return
            self._unreplicated = np.zeros_like(self._written)
        before = _set_bits(self._unreplicated, first, count, value)
        self.unreplicated_pages += (count - before) if value else -before
        if not self.unreplicated_pages:
            self._unreplicated = None

    def _any_unreplicated(self, first: int, count: int) -> bool:
        if not self.unreplicated_pages or self._unreplicated is None:
            return False
        byte0, byte1 = first >> 3, ((first + count - 1) >> 3) + 1
        raw = int.from_bytes(self._unreplicated[byte0:byte1], "little")
        return bool((raw >> (first & 7)) & ((1 << count) - 1))

    def mark_unreplicated(self, bitmap: bytes) -> int:
        """Adopt the mirror's list of mirror-only pages (a restarted client); returns how many.

        They are marked written too, and the resync task copies them to their replicas."""
        theirs = np.frombuffer(bitmap, dtype=np.uint8)[: self._written.shape[0]]
        if not theirs.any():
            return self.unreplicated_pages
        if self._unreplicated is None:
            self._unreplicated = np.zeros_like(self._written)
        self._unreplicated[: theirs.shape[0]] |= theirs
        self._written[: theirs.shape[0]] |= theirs
        self.unreplicated_pages = int(np.unpackbits(self._unreplicated).sum())
        return self.unreplicated_pages

    def written_anywhere(self) -> bool:
        """Some page may be written (marked, or in a slab adopted with unknown contents)."""
        return bool(self._maybe_written(0, self.page_count).any())

    def written_pages(self) -> int:
        return int(np.unpackbits(self._written).sum())

    def replicas_of(self, slab: int) -> list[Replica] | None:
        return self._slab_replicas[slab]

    def set_replicas(
        self,
        slab: int,
        replicas: list[Replica],
        filling: list[Replica] | None = None,
        *,
        adopted: bool = False,
    ) -> None:
        """Adopt a replica set for `slab` (a map update from placement).

        Args:
            replicas: servers holding the slab: read and written.
            filling: servers a slab push is copying to: written, not read yet.
            adopted: the slab comes from placement's map, not from our own allocation
                (client restart): its written pages are unknown here.
        """
        if adopted and self._slab_replicas[slab] is None:
            self._slab_unknown[slab] = True
        self._slab_replicas[slab] = list(replicas)
        self._slab_filling[slab] = list(filling or [])
        for replica in [*replicas, *self._slab_filling[slab]]:
            self._link(replica)

    def keep_only_servers(self, server_ids: set[str]) -> None:
        """Close links to servers placement no longer lists (dead or drained)."""
        for server_id in list(self._links):
            if server_id not in server_ids:
                self._links.pop(server_id).close()
                self._failed.pop(server_id, None)

    def mark_written(self, first: int, count: int) -> None:
        """Record pages as written (rebuilding state after a client restart)."""
        self._set_written(first, count, True)

    # -- replicas --------------------------------------------------------------------------

    def _link(self, replica: Replica) -> PageServerLink:
        link = self._links.get(replica.server_id)
        if (
            link is None
            or link.endpoint != replica.endpoint
            or link.server_key != replica.public_key
        ):
            if link is not None:
                link.close()
            link = PageServerLink(
                replica.server_id,
                replica.endpoint,
                context=self._context,
                security=self._security,
                server_key=replica.public_key,
                tenant=self.tenant,
                volume=self.volume,
                timeout=self._timeout,
                malformed=self.malformed,
            )
            self._links[replica.server_id] = link
        return link

    async def _replicas(self, slab: int) -> list[Replica]:
        replicas = self._slab_replicas[slab]
        if replicas is not None:
            return replicas
        pending = self._allocating.get(slab)
        if pending is None:
            pending = asyncio.get_running_loop().create_future()
            self._allocating[slab] = pending
            try:
                allocated = await self._placement.allocate(slab)
            except Exception as exc:
                pending.set_exception(exc)
                pending.exception()  # retrieved here; waiters re-raise it
                del self._allocating[slab]
                raise BackendError(errno.EIO, f"no replicas for slab {slab}: {exc}") from exc
            self.set_replicas(slab, allocated)
            del self._allocating[slab]
            pending.set_result(allocated)
            return allocated
        try:
            return await pending
        except Exception as exc:
            raise BackendError(errno.EIO, f"no replicas for slab {slab}: {exc}") from exc

    def _live(self, replicas: list[Replica]) -> list[Replica]:
        if not self._failed:
            return replicas
        now = time.monotonic()
        for server_id, since in list(self._failed.items()):
            if now - since > FAILURE_BACKOFF:
                del self._failed[server_id]
        return [r for r in replicas if r.server_id not in self._failed]

    def _write_targets(self, slab: int, replicas: list[Replica]) -> list[Replica]:
        return self._live([*replicas, *self._slab_filling[slab]])

    def _readable(self, slab: int, replicas: list[Replica]) -> list[Replica]:
        """Live replicas of `slab` without a missed write; all live ones if that is none
        (a stale copy is then all there is)."""
        live = self._live(replicas)
        stale = self._stale.get(slab)
        if not stale:
            return live
        fresh = [r for r in live if r.server_id not in stale]
        return fresh or live

    def _missed_write(self, slab: int, server_id: str) -> None:
        """`server_id` did not store a write of `slab` that another replica stored: its
        copy is stale. Stop reading it and tell placement, which replaces it."""
        marks = self._stale.setdefault(slab, {})
        mark = marks.get(server_id)
        now = time.monotonic()
        if mark is not None and (mark[1] is not None or now - mark[0] < FAILURE_BACKOFF):
            return  # reported already (and answered, or not long ago)
        if mark is None:
            log.warning(
                "replica %s missed a write of slab %d: not read until replaced", server_id, slab
            )
            self.stats.missed_writes += 1
        marks[server_id] = [now, None]
        self._placement.report_failure(server_id, slab, "missed a write", missed_write=True)

    def stale_reported(self, server_id: str, slab: int, epoch: int) -> None:
        """Placement answered a missed-write report at map `epoch`."""
        mark = self._stale.get(slab, {}).get(server_id)
        if mark is not None and mark[1] is None:
            mark[1] = epoch

    def map_applied(self, epoch: int) -> None:
        """After a map at `epoch` was applied: forget stale marks placement has acted on
        (the server left the slab, or the map is at or past the report's answer: it was
        kept as the last copy, or replaced and filled anew), report unanswered ones again."""
        now = time.monotonic()
        for slab, marks in list(self._stale.items()):
            listed = {r.server_id for r in self._slab_replicas[slab] or []}
            for server_id, (reported, answered) in list(marks.items()):
                if server_id not in listed or (answered is not None and epoch >= answered):
                    del marks[server_id]
                elif answered is None and now - reported >= FAILURE_BACKOFF:
                    marks[server_id] = [now, None]
                    self._placement.report_failure(
                        server_id, slab, "missed a write", missed_write=True
                    )
            if not marks:
                del self._stale[slab]

    def _replica_failed(self, failure: ReplicaFailure, slab: int) -> None:
        self.stats.replica_failures += 1
        if failure.server_id not in self._failed:
            log.warning(
                "replica failed server=%s code=%s detail=%s",
                failure.server_id,
                failure.code,
                failure.detail,
            )
            self._failed[failure.server_id] = time.monotonic()
            if self._on_failure is not None:
                self._on_failure(failure.server_id)
        self._placement.report_failure(failure.server_id, slab, f"{failure.code}")

    def forget_failure(self, server_id: str) -> None:
        """Use `server_id` again (placement says it is alive and holds our slabs)."""
        self._failed.pop(server_id, None)

    # -- Backend interface -----------------------------------------------------------------

    def size(self) -> int:
        return self._size

    async def pread(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        first = offset // PAGE_SIZE
        last = (offset + length - 1) // PAGE_SIZE
        count = last - first + 1
        ahead = self.read_ahead
        if ahead is not None:
            hit = ahead.lookup(first, count)
            if hit is None and (fetching := ahead.pending(first, count)) is not None:
                await asyncio.wait((fetching,))  # not `await`: cancelling us must not cancel it
                hit = ahead.lookup(first, count)
                ahead.waited += count if hit is not None else 0
            window = ahead.next_window(first, count, self.page_count, SLAB_PAGES)
            if window is not None:
                # Only pages known written: the rest read as zeros without asking anyone,
                # and on a slab adopted after a restart a replica lacking a page that was
                # never written is no failure worth reporting for a guess.
                start = window[0]
                bits = self._written_bits(start, window[1] - start)
                written = ((bits ^ (bits + 1)) >> 1).bit_length()  # leading pages set
                if written:
                    fetch = ahead.begin(start, start + written)
                    task = asyncio.ensure_future(self._fetch_ahead(fetch))
                    self._fetching.add(task)
                    task.add_done_callback(self._fetching.discard)
            if hit is not None and (plain := self._open_ahead(first, count, *hit)) is not None:
                skip = offset - first * PAGE_SIZE
                return plain[skip : skip + length]
        slab = first // SLAB_PAGES
        if (
            count <= FAST_PAGES
            and last // SLAB_PAGES == slab
            and not self._slab_unknown[slab]
            and not self._any_unreplicated(first, count)
        ):
            fast = await self._read_fast(first, count, slab)
            if fast is not None:
                skip = offset - first * PAGE_SIZE
                return fast[skip : skip + length]
        pages = await self._load(first, count)
        skip = offset - first * PAGE_SIZE
        view = memoryview(pages.data).cast("B")
        return view[skip : skip + length]

    def _written_bits(self, first: int, count: int) -> int:
        """Bit i set if page first + i is marked written (a Python int: no numpy call)."""
        byte0 = first >> 3
        raw = int.from_bytes(self._written[byte0 : ((first + count - 1) >> 3) + 1], "little")
        return (raw >> (first & 7)) & ((1 << count) - 1)

    async def _read_fast(self, first: int, count: int, slab: int) -> memoryview | None:
        """Small reads within one slab in plain Python (numpy's per-call cost dominates a
        4 KiB read). None when the general path must decide: some pages written and some
        not, a replica failing, or a checksum mismatch."""
        bits = self._written_bits(first, count)
        if bits == 0:
            self.stats.pages_read_zero += count
            return memoryview(bytes(count * PAGE_SIZE))
        replicas = self._slab_replicas[slab]
        if bits != (1 << count) - 1 or replicas is None:
            return None
        live = self._readable(slab, replicas)
        if not live:
            return None
        replica = live[slab % len(live)]
        link = self._links.get(replica.server_id) or self._link(replica)
        if not link.gathering("get"):
            # Another replica already gathering a GET this turn takes the read too: one
            # message of many pages costs far less than one per server (a ZeroMQ message
            # costs tens of microseconds of CPU on each side), and the turns rotate over
            # the replicas by slab, which still spreads the load.
            for other in live:
                other_link = self._links.get(other.server_id)
                if other_link is not None and other_link.gathering("get"):
                    link = other_link
                    break
        page = first - slab * SLAB_PAGES
        keys = _PAIRS[count].pack(*_interleave(slab, page, count))
        try:
            future, start = link.submit_get(keys, first, first + count - 1)
            result = await future
        except ReplicaFailure:
            return None  # the general path fails over and reports
        whole = _whole_run(result, start, count, sealed=self.sealer is not None)
        # None: the general path fails over, counts and reports.
        return None if whole is None else self._open_run(first, count, *whole)

    def _open_run(self, first: int, count: int, data: Any, seals: Any) -> memoryview | None:
        """Plaintext of pages [first, first + count) of one slab, or None if one fails
        authentication (the caller's usual path counts and reports it)."""
        if self.sealer is not None:
            slab = first // SLAB_PAGES
            page = first - slab * SLAB_PAGES
            plain = bytearray(count * PAGE_SIZE)
            if self.sealer.open_into(slab, range(page, page + count), data, seals, plain):
                return None
            data = plain
        self.stats.pages_read_remote += count
        return memoryview(data)

    async def _fetch_ahead(self, fetch: Fetch) -> None:
        """Fetch sealed pages ahead of a sequential reader into the read-ahead ring, from one
        replica, as it holds them. A guess: nothing fails over or is reported here."""
        assert self.read_ahead is not None
        pages = seals = None
        try:
            pages, seals = await self._fetch_sealed(fetch.first, fetch.end - fetch.first)
        finally:
            self.read_ahead.finish(fetch, pages, seals)

    async def _fetch_sealed(self, first: int, count: int) -> tuple[Any, Any]:
        """Pages [first, first + count) of one slab as a replica holds them, with their
        seals, if every one comes back found and checksummed; else (None, None)."""
        slab = first // SLAB_PAGES
        replicas = self._slab_replicas[slab]
        if replicas is None or self._slab_unknown[slab] or self._any_unreplicated(first, count):
            return None, None  # unknown pages, or newest on the mirror: the usual path knows
        live = self._readable(slab, replicas)
        if not live:
            return None, None
        replica = live[(slab + first // count) % len(live)]  # windows alternate replicas
        link = self._links.get(replica.server_id) or self._link(replica)
        try:
            future, start = link.submit_get(
                page_keys(first, count, SLAB_PAGES), first, first + count - 1
            )
            result = await future
        except ReplicaFailure:
            return None, None
        whole = _whole_run(result, start, count, sealed=self.sealer is not None)
        if whole is None:
            return None, None
        data, seals = whole
        return (
            np.frombuffer(data, dtype=np.uint8).reshape(count, PAGE_SIZE),
            np.frombuffer(seals, dtype=np.uint8).reshape(count, SEAL_BYTES),
        )

    def _open_ahead(self, first: int, count: int, data: bytes, seals: bytes) -> memoryview | None:
        """Plaintext of pages found in the read-ahead ring, or None (the read takes the usual
        path) if they span two slabs or one fails authentication (then the ring drops them)."""
        if (first + count - 1) // SLAB_PAGES != first // SLAB_PAGES:
            return None
        plain = self._open_run(first, count, data, seals)
        if plain is None:
            assert self.read_ahead is not None
            self.read_ahead.forget(first, first + count)
        return plain

    def _forget_ahead(self, offset: int, length: int) -> None:
        """Pages of [offset, offset + length) change: the read-ahead ring drops them."""
        if self.read_ahead is not None:
            self.read_ahead.forget(offset // PAGE_SIZE, -(-(offset + length) // PAGE_SIZE))

    async def _load(self, first: int, count: int) -> PageArray:
        """Pages [first, first + count) from wherever the newest copy is: the replicas, or
        the mirror for mirror-only pages and when no replica answers."""
        if self.mirror is not None and self._any_unreplicated(first, count):
            if self.mirror.incomplete:
                return await self._load_mixed(first, count)
            return await self._read_local(first, count)
        try:
            return await self._read_pages(first, count)
        except BackendError as exc:
            if self.mirror is None:
                raise
            log.warning("no replica served pages %d+%d (%s); reading the mirror", first, count, exc)
            return await self._read_local(first, count)

    async def _load_mixed(self, first: int, count: int) -> PageArray:
        """Mirror-only pages from a mirror that may have missed other writes, the rest of
        the run from the replicas."""
        assert self._unreplicated is not None
        mine = _bits_of(self._unreplicated, first, count)
        rows = await self._read_local(first, count, mirror_only=True)  # a fresh array
        for run_first, run_count in _runs(np.flatnonzero(~mine) + first):
            offset = run_first - first
            rows[offset : offset + run_count] = await self._read_pages(run_first, run_count)
        return rows

    async def _read_local(self, first: int, count: int, *, mirror_only: bool = False) -> PageArray:
        """Pages from the mirror and its write cache; pages never written read as zeros.
        `mirror_only`: the caller keeps only mirror-only pages (see MirrorLink.read)."""
        assert self.mirror is not None
        try:
            rows = await self.mirror.read(first, count, mirror_only=mirror_only)
        except MirrorFailure as exc:
            raise BackendError(
                errno.EIO, f"pages {first}+{count}: no replica and no mirror: {exc}"
            ) from exc
        written = self._maybe_written(first, count)
        if not written.all():
            rows[~written] = 0  # trimmed on the mirror too, unless that trim was missed
        self.stats.pages_read_mirror += count
        return rows

    async def _read_pages(self, first: int, count: int) -> PageArray:
        """Pages [first, first + count) as a (count, 4096) array the caller may keep."""
        written = self._maybe_written(first, count)
        if not written.any():
            self.stats.pages_read_zero += count
            return np.zeros((count, PAGE_SIZE), dtype=np.uint8)
        out: PageArray | None = None
        for seg_first, seg_count in _slab_segments(first, count):
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
        self.stats.pages_read_zero += int(count - written.sum())
        assert out is not None
        return out

    async def _read_segment(
        self, first: int, count: int, mask: np.ndarray[Any, np.dtype[np.bool_]]
    ) -> PageArray:
        """The written pages (where `mask`) of one slab's run of pages, failing over."""
        slab = first // SLAB_PAGES
        replicas = self._slab_replicas[slab]
        if replicas is None:
            raise BackendError(errno.EIO, f"slab {slab} has written pages but no replicas")
        keys = page_keys(first, count, SLAB_PAGES)[mask]
        wanted = keys.shape[0]
        rows = np.empty((wanted, PAGE_SIZE), dtype=np.uint8)
        todo = np.ones(wanted, dtype=np.bool_)
        # Replicas that served some of these pages damaged, for read repair (see
        # _read_repair), and whether the slab saw no write from the read's start on.
        to_repair: list[tuple[Replica, np.ndarray[Any, np.dtype[np.intp]]]] = []
        repair_rows: PageArray | None = None
        repair_seals = np.zeros((0, SEAL_BYTES), dtype=np.uint8)
        write_mark = self._slab_write_mark(slab)
        # Replicas that answered, and pages any of them holds (intact or not): only pages
        # that every replica answered for and none holds may read as never written.
        answered = 0
        held = np.zeros(wanted, dtype=np.bool_)
        live = self._readable(slab, replicas)
        # Spread reads over a slab's replicas: slab n prefers its (n mod k)-th replica.
        if live:
            shift = slab % len(live)
            live = live[shift:] + live[:shift]
        for attempt, replica in enumerate(live):
            link = self._links.get(replica.server_id) or self._link(replica)
            sub = keys if todo.all() else keys[todo]
            try:
                future, start = link.submit_get(sub, first, first + count - 1)
                result = await future
            except ReplicaFailure as failure:
                self._replica_failed(failure, slab)
                self.stats.failovers += 1
                continue
            answered += 1
            found = result.found[start : start + sub.shape[0]]
            crcs = result.crcs[start : start + sub.shape[0]]
            data = result.data[start : start + sub.shape[0]]
            good = found.copy()
            if good.any():
                good[good] = checksum_pages(data[good]) == crcs[good]
            cipher = data
            seals = result.seals[start : start + sub.shape[0]]
            if self.sealer is not None:
                data = self._open(slab, sub, data, seals, good)
            if good.all() and todo.all():
                self.stats.pages_read_remote += wanted
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
            damaged = ~good if not self._slab_unknown[slab] else found & ~good
            if damaged.any():
                to_repair.append((replica, positions[damaged]))
            if not todo.any():
                self.stats.pages_read_remote += wanted
                if to_repair and repair_rows is not None:
                    self._read_repair(
                        slab, first, count, keys, repair_rows, repair_seals, to_repair, write_mark
                    )
                return rows
            if attempt + 1 < len(live):
                self.stats.failovers += 1
            bad = int(np.count_nonzero(~good))
            log.warning(
                "replica %s lacks or corrupts %d pages of slab %d; failing over",
                replica.server_id,
                bad,
                slab,
            )
            self._placement.report_failure(replica.server_id, slab, "missing or corrupt pages")
        if self._slab_unknown[slab] and answered == len(replicas) and not held[todo].any():
            # Adopted after a restart: every replica answered and none holds these pages, so
            # they were never written (or trimmed). They read as zeros. A replica that did not
            # answer, or a page some replica holds corrupt, is no proof of that: EIO (and the
            # mirror, if any).
            rows[todo] = 0
            return rows
        raise BackendError(
            errno.EIO, f"{int(todo.sum())} pages of slab {slab} are on no live replica"
        )

    def _open(
        self,
        slab: int,
        keys: Any,
        cipher: PageArray,
        seals: PageArray,
        good: np.ndarray[Any, np.dtype[np.bool_]],
    ) -> PageArray:
        """Decrypt the rows where `good` (checksum matched) into a new array; rows that fail
        authentication are cleared from `good` and counted."""
        assert self.sealer is not None
        plain = np.empty(cipher.shape, dtype=np.uint8)
        if good.all():
            failed = self.sealer.open_into(slab, keys["page"].tolist(), cipher, seals, plain)
            rows = np.asarray(failed, dtype=np.intp)
        elif good.any():
            picked = np.flatnonzero(good)
            opened = np.empty((picked.size, PAGE_SIZE), dtype=np.uint8)
            failed = self.sealer.open_into(
                slab, keys["page"][picked].tolist(), cipher[picked], seals[picked], opened
            )
            plain[picked] = opened
            rows = picked[np.asarray(failed, dtype=np.intp)]
        else:
            return plain
        if rows.size:
            good[rows] = False
            self.stats.auth_failures += int(rows.size)
            log.warning(
                "%d pages of slab %d failed authentication (altered or misplaced ciphertext)",
                rows.size,
                slab,
            )
        return plain

    def _slab_write_mark(self, slab: int) -> int | None:
        """The slab's write count if no write or trim of it is in flight, else None."""
        return None if self._slab_writing[slab] else self._slab_writes[slab]

    def _read_repair(
        self,
        slab: int,
        first: int,
        count: int,
        keys: KeyArray,
        rows: PageArray,
        seals: PageArray,
        damaged: list[tuple[Replica, np.ndarray[Any, np.dtype[np.intp]]]],
        write_mark: int | None,
    ) -> None:
        """Write the good copies of pages back to replicas that served them corrupt or not
        at all, in the background (the read does not wait), bounded by REPAIR_PAGES_MAX.

        Only when the slab had no write or trim in flight when the read started and none
        since (`write_mark`): then the good copy is the newest acknowledged data, and any
        later write to the replica is sent after the repair on the same link, so the repair
        can never put older data over a newer write. Otherwise it is skipped; the next read
        of the page tries again.
        """
        pages = sum(int(positions.size) for _, positions in damaged)
        if write_mark is None or self._slab_write_mark(slab) != write_mark:
            self.stats.read_repairs_skipped += pages
            return
        if self._repairing + pages > REPAIR_PAGES_MAX:
            self.stats.read_repairs_skipped += pages
            return
        current = self._slab_replicas[slab] or []
        for replica, positions in damaged:
            if replica not in current:
                continue  # left the slab meanwhile: nothing to repair there
            good_rows = rows[positions]  # as served: sealed when pages are encrypted
            link = self._links.get(replica.server_id) or self._link(replica)
            try:
                future = link.submit_put(
                    keys[positions],
                    checksum_pages(good_rows),
                    good_rows,
                    seals[positions],
                    first,
                    first + count - 1,
                )
            except ReplicaFailure:
                self.stats.read_repairs_failed += int(positions.size)
                continue
            self._repairing += int(positions.size)
            self._spawn(self._repair_done(replica, slab, int(positions.size), future))

    async def _repair_done(
        self, replica: Replica, slab: int, pages: int, future: asyncio.Future[Any]
    ) -> None:
        try:
            await future
        except ReplicaFailure as failure:
            self.stats.read_repairs_failed += pages
            log.warning(
                "read repair of %d pages on %s failed: %s", pages, replica.server_id, failure
            )
            return
        finally:
            self._repairing -= pages
        self.stats.read_repairs += pages
        log.info(
            "read repair: wrote %d good pages of slab %d back to %s", pages, slab, replica.server_id
        )

    async def _changing(self, offset: int, length: int, change: Awaitable[None]) -> None:
        """Run a write, trim or zeroing of [offset, offset + length), its pages dropped from
        the read-ahead ring before and after: a fetch ahead that read the replicas while the
        change was landing is not kept (see readahead)."""
        self._forget_ahead(offset, length)
        try:
            await change
        finally:
            self._forget_ahead(offset, length)

    async def pwrite(self, offset: int, data: memoryview, fua: bool) -> None:
        await self._changing(offset, len(data), self._pwrite(offset, data))

    async def _pwrite(self, offset: int, data: memoryview) -> None:
        end = offset + len(data)
        if offset % PAGE_SIZE == 0 and end % PAGE_SIZE == 0:
            pages = np.frombuffer(data, dtype=np.uint8).reshape(-1, PAGE_SIZE)
            first = offset // PAGE_SIZE
            async with self._ordered_write(first, first + pages.shape[0] - 1):
                await self._store(first, pages)
            return
        await self._read_modify_write(offset, end, lambda buf, skip: _patch(buf, skip, data))

    @contextlib.asynccontextmanager
    async def _ordered_write(
        self, first: int, last: int, edges: tuple[int, ...] = ()
    ) -> AsyncIterator[None]:
        """Run a write of pages [first, last] in arrival order with the writes it could undo.

        A partial write reads back its `edges` (the pages it patches) and writes them whole:
        it waits for every earlier write touching an edge, or it could read a page before
        that write lands and then put the old bytes back. A whole-page write or trim waits
        for the earlier partial writes whose edges it covers, for the same reason. Waits
        only ever point at earlier arrivals, so they cannot deadlock; whole-page writes with
        no partial write in flight (the kernel's swap traffic) skip the scan. A mirror rebuild
        reading these pages meanwhile reads them again (see _rebuild_run)."""
        arrival = next(self._write_arrivals)
        entry: list[Any] = [first, last, edges, None]
        self._writes_in_flight[arrival] = entry
        run = self._rebuilding
        if run is not None and first < run[1] and run[0] <= last:
            run[2] = True
        self._partial_writes += bool(edges)
        try:
            if edges or self._partial_writes:
                for earlier, other in list(self._writes_in_flight.items()):
                    if earlier >= arrival:
                        break  # a dict keeps insertion order: the rest came later
                    if earlier not in self._writes_in_flight:
                        continue  # finished while this one waited for another
                    if edges:
                        hit = any(other[0] <= page <= other[1] for page in edges)
                    else:
                        hit = any(first <= page <= last for page in other[2])
                    if hit:
                        if other[3] is None:
                            other[3] = asyncio.get_running_loop().create_future()
                        await other[3]
            yield
        finally:
            del self._writes_in_flight[arrival]
            self._partial_writes -= bool(edges)
            if entry[3] is not None and not entry[3].done():
                entry[3].set_result(None)

    async def _read_modify_write(
        self, offset: int, end: int, patch: Callable[[PageArray, int], None]
    ) -> None:
        """Write a range that does not start and end on page boundaries."""
        first = offset // PAGE_SIZE
        last = (end - 1) // PAGE_SIZE
        async with self._ordered_write(first, last, tuple(sorted({first, last}))):
            pages = (await self._load(first, last - first + 1)).copy()
            patch(pages, offset - first * PAGE_SIZE)
            await self._store(first, pages)

    async def _store(self, first: int, pages: PageArray) -> None:
        """Write pages to every live replica and, behind them, to the mirror; with the
        network down, to the mirror alone (durably) as unreplicated pages."""
        mirror = self.mirror
        if mirror is None:
            await self._write_pages(first, pages)
            return
        count = pages.shape[0]
        if self._resync_busy:
            await self._wait_for_resync(first, count)
        await mirror.write_behind(first, pages)
        try:
            await self._write_pages(first, pages)
        except BackendError as exc:
            try:
                await mirror.write_durable(first, pages)
            except MirrorFailure as mirror_exc:
                raise BackendError(
                    errno.EIO, f"{exc.detail}; and the mirror failed: {mirror_exc}"
                ) from exc
            if not self.network_down:
                log.warning("network down: writing to the mirror alone (%s)", exc.detail)
            self.network_down = True
            self._set_written(first, count, True)
            self._set_unreplicated(first, count, True)
            self.stats.pages_written_mirror_only += count
            return
        if self._any_unreplicated(first, count):
            # The replicas now hold the newest data of these pages.
            self._set_unreplicated(first, count, False)
            mirror.clear_unreplicated(first, count)

    async def _wait_for_resync(self, first: int, count: int) -> None:
        slabs = set(range(first // SLAB_PAGES, (first + count - 1) // SLAB_PAGES + 1))
        while self._resync_busy & slabs:
            self._resync_done.clear()
            await self._resync_done.wait()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        task.add_done_callback(consume_outcome)

    async def _write_pages(self, first: int, pages: PageArray) -> None:
        count = pages.shape[0]
        if self.sealer is not None:
            # Sealed once, the same ciphertext to every replica (one nonce per page-out).
            try:
                pages, seals = self.sealer.seal(first, pages)
            except (SealingError, OSError) as exc:  # the nonce state could not be advanced
                raise BackendError(errno.EIO, f"cannot seal pages: {exc}") from exc
        else:  # --no-encrypt-pages
            # The replicas' messages must own their bytes, as the sealed ciphertext does: one
            # for a replica that timed out may still wait on its link after this request
            # returns and the NBD layer reuses the payload buffer.
            pages = pages.copy()
            seals = np.zeros((count, SEAL_BYTES), dtype=np.uint8)
        crcs = checksum_pages(pages)
        waits: list[tuple[int, int, int, list[tuple[Replica, asyncio.Future[Any] | None]]]] = []
        writing: list[int] = []
        try:
            await self._submit_writes(first, pages, crcs, seals, waits, writing)
            await self._await_writes(waits)
        finally:
            for slab in writing:
                self._slab_writing[slab] -= 1
        self.stats.pages_written += count

    async def _submit_writes(
        self,
        first: int,
        pages: PageArray,
        crcs: U32Array,
        seals: PageArray,
        waits: list[tuple[int, int, int, list[tuple[Replica, asyncio.Future[Any] | None]]]],
        writing: list[int],
    ) -> None:
        """Send each slab's part of a write to its replicas; fills `waits` and `writing`."""
        for seg_first, seg_count in _slab_segments(first, pages.shape[0]):
            slab = seg_first // SLAB_PAGES
            replicas = await self._replicas(slab)
            self._slab_writes[slab] += 1
            self._slab_writing[slab] += 1
            writing.append(slab)
            offset = seg_first - first
            if seg_count <= FAST_PAGES:  # packed in plain Python: numpy costs more here
                page = seg_first - slab * SLAB_PAGES
                keys: Any = _PAIRS[seg_count].pack(*_interleave(slab, page, seg_count))
            else:
                keys = page_keys(seg_first, seg_count, SLAB_PAGES)
            rows = pages[offset : offset + seg_count]
            seg_crcs = crcs[offset : offset + seg_count]
            seg_seals = seals[offset : offset + seg_count]
            futures: list[tuple[Replica, asyncio.Future[Any] | None]] = []
            targets = self._write_targets(slab, replicas)
            # A replica or push target left out (failing, backing off) misses this write
            # like one that fails it: None stands for its future.
            futures += [
                (r, None) for r in [*replicas, *self._slab_filling[slab]] if r not in targets
            ]
            for replica in targets:
                link = self._links.get(replica.server_id) or self._link(replica)
                try:
                    futures.append(
                        (
                            replica,
                            link.submit_put(
                                keys,
                                seg_crcs,
                                rows,
                                seg_seals,
                                seg_first,
                                seg_first + seg_count - 1,
                            ),
                        )
                    )
                except ReplicaFailure as failure:
                    self._replica_failed(failure, slab)
                    futures.append((replica, None))
            waits.append((slab, seg_first, seg_count, futures))

    async def _await_writes(
        self, waits: list[tuple[int, int, int, list[tuple[Replica, asyncio.Future[Any] | None]]]]
    ) -> None:
        for slab, seg_first, seg_count, futures in waits:
            stored = 0
            missed: list[str] = []
            replicas = self._slab_replicas[slab] or []
            for replica, future in futures:
                if future is None:
                    missed.append(replica.server_id)
                    continue
                try:
                    await future
                except ReplicaFailure as failure:
                    self._replica_failed(failure, slab)
                    missed.append(replica.server_id)
                    continue
                # Only a replica counts: a push target alone is no readable copy (and the
                # push may yet be abandoned and its copy dropped).
                stored += replica in replicas
            if not stored:
                # No replica has it (network down): none is staler than another.
                raise BackendError(errno.EIO, f"no live replica stored slab {slab}'s pages")
            for server_id in missed:
                self._missed_write(slab, server_id)
            self._set_written(seg_first, seg_count, True)

    async def flush(self) -> None:
        # A write completes only once every live replica acknowledged it: there is nothing
        # left to flush.
        return None

    async def trim(self, offset: int, length: int) -> None:
        await self._changing(offset, length, self._free_whole_pages(offset, length))

    async def zero(self, offset: int, length: int, may_trim: bool) -> None:
        await self._changing(offset, length, self._zero(offset, length))

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
        async with self._ordered_write(first, end_page - 1):
            await self._free_pages(first, end_page - first)

    async def _free_pages(self, first: int, count: int) -> None:
        written = self._maybe_written(first, count)
        self._set_written(first, count, False)
        if self.mirror is not None:
            self._set_unreplicated(first, count, False)
            self.mirror.trim(first, count)
        if not written.any():
            return
        pending: list[tuple[int, asyncio.Future[Any]]] = []
        writing: list[int] = []
        try:
            self._submit_deletes(first, count, written, pending, writing)
            await self._await_deletes(pending)
        finally:
            for slab in writing:
                self._slab_writing[slab] -= 1

    def _submit_deletes(
        self,
        first: int,
        count: int,
        written: np.ndarray[Any, np.dtype[np.bool_]],
        pending: list[tuple[int, asyncio.Future[Any]]],
        writing: list[int],
    ) -> None:
        for seg_first, seg_count in _slab_segments(first, count):
            mask = written[seg_first - first : seg_first - first + seg_count]
            slab = seg_first // SLAB_PAGES
            replicas = self._slab_replicas[slab]
            if not mask.any() or replicas is None:
                continue
            self._slab_writes[slab] += 1
            self._slab_writing[slab] += 1
            writing.append(slab)
            keys = page_keys(seg_first, seg_count, SLAB_PAGES)[mask]
            for replica in self._write_targets(slab, replicas):
                link = self._links.get(replica.server_id) or self._link(replica)
                try:
                    pending.append(
                        (slab, link.submit_delete(keys, seg_first, seg_first + seg_count - 1))
                    )
                except ReplicaFailure as failure:
                    self._replica_failed(failure, slab)

    async def _await_deletes(self, pending: list[tuple[int, asyncio.Future[Any]]]) -> None:
        for slab, future in pending:
            try:
                await future
            except ReplicaFailure as failure:
                # The pages are unmarked already and read as zeros; a replica that missed the
                # delete only holds garbage until the slab is dropped.
                self._replica_failed(failure, slab)

    # -- resync ----------------------------------------------------------------------------

    def start_resync(self) -> None:
        """Start the task that copies mirror-only pages to their replicas."""
        if self.mirror is not None and self._resync_task is None:
            self._resync_task = asyncio.get_running_loop().create_task(self._resync_loop())

    @property
    def mode(self) -> str:
        """normal, network_down (writes go to the mirror alone) or resyncing."""
        if not self.unreplicated_pages:
            return "normal"
        return "network_down" if self.network_down else "resyncing"

    async def _resync_loop(self) -> None:
        while True:
            # A timer, not a wait for an event: resync polls whether replicas are back.
            await asyncio.sleep(self._resync_interval)
            try:
                if self.unreplicated_pages:
                    await self.resync_once()
                mirror = self.mirror
                # While pages wait for their resync, the replicas are known to be away (the
                # resync probes them); otherwise a rebuild finds out for itself.
                if (
                    mirror is not None
                    and mirror.incomplete
                    and not (self.network_down and self.unreplicated_pages)
                    and mirror.usable()
                ):
                    await self.rebuild_mirror()
            except Exception:  # the task must outlive any one failure
                log.exception("resync round failed")

    async def resync_once(self) -> int:
        """Copy every mirror-only page to its replicas; returns pages copied this round.

        Stops at the first run the replicas cannot take (still down); the next round
        starts over."""
        if self._unreplicated is None:
            return 0
        bits = np.unpackbits(self._unreplicated, bitorder="little")[: self.page_count]
        pages = np.flatnonzero(bits)
        if not pages.size:
            return 0
        if self.network_down:
            log.info("trying to resync %d mirror-only pages", pages.size)
        copied = 0
        for run_first, run_count in _runs(pages):
            for seg_first, seg_count in _slab_segments(run_first, run_count):
                if not await self._resync_run(seg_first, seg_count):
                    return copied
                copied += seg_count
        if copied and not self.unreplicated_pages:
            log.info("resync done: the replicas hold every page again")
        return copied

    async def _resync_run(self, first: int, count: int) -> bool:
        """Copy one run (inside one slab) from the mirror to the replicas."""
        assert self.mirror is not None
        slab = first // SLAB_PAGES
        # Writes to this slab wait meanwhile: one sent between our mirror read and our
        # replica write would be overwritten by the older data we copy.
        self._resync_busy.add(slab)
        try:
            rows = await self._read_local(first, count, mirror_only=True)
            # Only pages still mirror-only: a write since may have replicated some.
            if self._unreplicated is None:
                return True  # a write since replicated every page
            keep = _bits_of(self._unreplicated, first, count)
            for sub_first, sub_count in _runs(np.flatnonzero(keep) + first):
                offset = sub_first - first
                await self._write_pages(sub_first, rows[offset : offset + sub_count])
                self._set_unreplicated(sub_first, sub_count, False)
                await self.mirror.mark_replicated(sub_first, sub_count)
                self.stats.pages_resynced += sub_count
        except (BackendError, MirrorFailure) as exc:
            self.stats.resync_failures += 1
            self.network_down = True
            log.debug("resync of pages %d+%d failed: %s", first, count, exc)
            return False
        finally:
            self._resync_busy.discard(slab)
            self._resync_done.set()
        self.network_down = False
        return True

    # -- mirror rebuild --------------------------------------------------------------------

    async def rebuild_mirror(self) -> bool:
        """Copy the device from the replicas to a mirror that may have missed writes, then
        trust it again; returns whether it is complete.

        Slab by slab: a slab with no written page is one trim, the others are read in runs of
        MAX_MIRROR_PAGES and written to the mirror (runs of zeros trimmed). Pages the mirror
        alone holds (unreplicated) are left as they are. Writes go on meanwhile: each run is
        sent to the mirror only if no change of its pages was in flight or started while it
        was read, and before any later change's write-behind (the mirror applies requests in
        order). If the replicas or the mirror fail, the round stops; the next one (the resync
        task's) goes on from there, or starts over if the mirror lost writes meanwhile."""
        mirror = self.mirror
        assert mirror is not None
        if not mirror.incomplete:
            return True
        if mirror.losses != self._rebuild_losses:
            self._rebuild_cursor, self._rebuild_losses = 0, mirror.losses
            log.warning("rebuilding the mirror from the replicas (it may have missed writes)")
        started = time.monotonic()
        while self._rebuild_cursor < self.page_count:
            first = self._rebuild_cursor
            slab_end = min((first // SLAB_PAGES + 1) * SLAB_PAGES, self.page_count)
            if self._maybe_written(first, slab_end - first).any():
                count = min(MAX_MIRROR_PAGES, slab_end - first)
            else:
                count = slab_end - first
            copied = await self._rebuild_run(first, count)
            if copied is None or mirror.losses != self._rebuild_losses:
                return False
            self.stats.pages_rebuilt += copied
            self._rebuild_cursor = first + count
        try:
            await mirror.barrier()  # every run sent is on the mirror's disk
        except MirrorFailure:
            return False
        if mirror.losses != self._rebuild_losses:
            return False
        mirror.incomplete = False
        self.stats.mirror_rebuilds += 1
        self._rebuild_cursor, self._rebuild_losses = 0, -1
        log.info(
            "mirror rebuilt: it holds every page again (last round %.1f s)",
            time.monotonic() - started,
        )
        return True

    async def _rebuild_run(self, first: int, count: int) -> int | None:
        """Copy pages [first, first + count) of one slab from the replicas to the mirror;
        returns the pages written (not trimmed), or None to stop the round."""
        mirror = self.mirror
        assert mirror is not None
        run: list[Any] = [first, first + count, False]
        self._rebuilding = run
        try:
            rereads = 0
            while rereads < REBUILD_REREADS:
                busy = next(
                    (
                        w
                        for w in self._writes_in_flight.values()
                        if w[0] < run[1] and run[0] <= w[1]
                    ),
                    None,
                )
                if busy is not None:
                    # It started before we looked and may land after our read: wait for it.
                    rereads += 1
                    if busy[3] is None:
                        busy[3] = asyncio.get_running_loop().create_future()
                    await busy[3]
                    continue
                run[2] = False
                written = self._maybe_written(first, count)
                rows = await self._read_pages(first, count) if written.any() else None
                await mirror.wait_for_room(0 if rows is None else count * PAGE_SIZE)
                if run[2]:
                    rereads += 1  # a change started meanwhile: what we read may be older
                    continue
                if not mirror.up:
                    return None
                return self._send_rebuilt(first, count, rows)  # no await since the check
            log.info("mirror rebuild: pages %d+%d keep changing; trying later", first, count)
            return None
        except BackendError as exc:
            log.info("mirror rebuild: pages %d+%d unreadable (%s); trying later", first, count, exc)
            return None
        finally:
            self._rebuilding = None

    def _send_rebuilt(self, first: int, count: int, rows: PageArray | None) -> int:
        mirror = self.mirror
        assert mirror is not None
        if self._unreplicated is None:
            copy = [(first, count)]
        else:
            keep = ~_bits_of(self._unreplicated, first, count)  # mirror-only pages stay
            copy = _runs(np.flatnonzero(keep) + first)
        written = 0
        for run_first, run_count in copy:
            if not mirror.up:
                break  # lost on the way (a failed send): the round sees the loss and stops
            if rows is None:
                mirror.trim(run_first, run_count)
                continue
            part = rows[run_first - first : run_first - first + run_count]
            if part.any():
                mirror.queue_write(run_first, part.tobytes())
                # A mark left from a resync whose mark_replicated the mirror lost must go:
                # the page is not mirror-only (a trim clears it by itself).
                mirror.clear_unreplicated(run_first, run_count)
                written += run_count
            else:
                mirror.trim(run_first, run_count)
        return written

    async def close(self) -> None:
        if self._resync_task is not None:
            self._resync_task.cancel()
        for task in list(self._fetching):  # guesses: nobody waits for them but readers
            task.cancel()
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
        for link in self._links.values():
            link.close()
        self._links.clear()
        for closer in self.on_close:
            await closer()
        if self.sealer is not None:
            self.sealer.close()


def _set_bits(bitmap: np.ndarray[Any, Any], first: int, count: int, value: bool) -> int:
    """Set or clear bits [first, first + count); returns how many were set before."""
    byte0, byte1 = first // 8, (first + count - 1) // 8 + 1
    if byte1 - byte0 <= 16:
        # A few bytes (every swap-sized write) as a Python int: no numpy call, each of
        # which costs microseconds.
        raw = int.from_bytes(bitmap[byte0:byte1], "little")
        mask = ((1 << count) - 1) << (first & 7)
        before = (raw & mask).bit_count()
        raw = raw | mask if value else raw & ~mask
        bitmap.data[byte0:byte1] = raw.to_bytes(byte1 - byte0, "little")
        return before
    bits = np.unpackbits(bitmap[byte0:byte1], bitorder="little")
    start = first - byte0 * 8
    before = int(bits[start : start + count].sum())
    bits[start : start + count] = value
    bitmap[byte0:byte1] = np.packbits(bits, bitorder="little")
    return before


def _bits_of(bitmap: np.ndarray[Any, Any], first: int, count: int) -> np.ndarray[Any, Any]:
    """Bits [first, first + count) as booleans."""
    byte0, byte1 = first // 8, (first + count - 1) // 8 + 1
    bits = np.unpackbits(bitmap[byte0:byte1], bitorder="little")
    start = first - byte0 * 8
    return bits[start : start + count].astype(np.bool_)


def _runs(pages: np.ndarray[Any, Any]) -> list[tuple[int, int]]:
    """Sorted page numbers as runs of consecutive pages: [(first, count), ...]."""
    if not pages.size:
        return []
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [pages.size]))
    return [(int(pages[a]), int(b - a)) for a, b in zip(starts, ends, strict=True)]


def _slab_segments(first: int, count: int) -> list[tuple[int, int]]:
    """Split pages [first, first + count) at slab boundaries and into runs a batch message
    can carry: [(first, count), ...]."""
    segments = []
    end = first + count
    while first < end:
        stop = min(end, (first // SLAB_PAGES + 1) * SLAB_PAGES, first + MAX_BATCH_PAGES)
        segments.append((first, stop - first))
        first = stop
    return segments


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

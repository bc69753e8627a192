"""The client's asyncio link to the local mirror, and the write cache in front of it.

Every page-out that goes to the replicas is also handed to `write_behind`: it copies the
pages into the bounded write cache (one bytes object per request, not per page) and returns
without waiting for the disk (Anemone's asynchronous local write). The page-outs made
within WRITE_BEHIND_DELAY, and those made while WRITE_WINDOW batches are already in flight,
go to the mirror together in one write_extents_request: at queue depth 32 a message per
page-out cost the client and the mirror more than everything else on the write path. An
entry leaves the cache when the mirror confirms the pages are on disk; until then a page-in
that has to be served locally (network down) reads it from the cache. When the cache is
full, `write_behind` waits for room: back-pressure on the NBD writer, never a dropped page.

`write_durable` is the network-down write: it returns only once the mirror has the pages on
disk (fdatasync'd) and has recorded them as unreplicated.

The mirror executes one connection's requests in order, so a read sees every write sent
before it; the cache overlay (oldest to newest) adds the writes that are still in flight.

The mirror is trusted to serve page-ins only while it is known to hold every acknowledged
write (`serves_reads`). At start the link attaches: the mirror says whether the last session
ended cleanly (`detach` after every write). If not (the client or the mirror crashed, or the
mirror file is new), the link starts `incomplete` and the backend rebuilds the mirror from
the replicas. If the mirror stops answering (a timeout, or its connection is lost: the
process died) while writes or trims were in flight, everything in flight fails, the cache is
released (the replicas still hold those pages) and the link becomes `incomplete` too: the
mirror has missed writes, and a stale page is worse than an error. The link tries the
mirror again after a back-off and keeps sending later writes to it; the backend's rebuild
makes it complete again. Pages written durably while the network was down (`write_durable`)
stay readable from an incomplete mirror: it alone holds them, and it confirmed each of them
on disk.

The socket is a `dealer.Dealer` (ZMTP from the event loop when plaintext, libzmq for Curve),
its requests a `dealer.PendingRequests`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Generator
from typing import TYPE_CHECKING, Any

import numpy as np
from remem_common.framing import encode
from remem_common.protocol.client_mirror import (
    MAX_MIRROR_BATCH_PAGES,
    MAX_MIRROR_PAGES,
    MIRROR_REPLY_ADAPTER,
    AttachMirrorReply,
    AttachMirrorRequest,
    DescribeMirrorRequest,
    DetachMirrorRequest,
    ListUnreplicatedReply,
    ListUnreplicatedRequest,
    MarkReplicatedRequest,
    MirrorReply,
    ReadPagesReply,
    ReadPagesRequest,
    TrimPagesRequest,
    WriteExtentsRequest,
    WritePagesRequest,
    pack_extents,
    parse_write_pages_reply,
)
from remem_common.protocol.envelope import ErrorReply
from remem_common.protocol.pages import PAGE_SIZE, PageArray
from remem_common.security import Security

from remem_client.dealer import Dealer, DealerBusy, Link

if TYPE_CHECKING:
    import zmq

    from remem_client.metrics import MalformedReplies

log = logging.getLogger("client.mirror")
# Seconds between attempts to reach a mirror that stopped answering.
RETRY_AFTER = 2.0
# Requests in flight at most: past it, write_behind waits like for a full cache. Keeps the
# DEALER's queue and the mirror's reply queue (ZeroMQ high-water marks, 1000 by default)
# from ever filling, where a send would fail or a reply be dropped.
MAX_IN_FLIGHT = 512
# Seconds a stopping client waits for the mirror to confirm the detach (shutdown must not
# hang on a mirror that is gone; it is then rebuilt at the next start).
DETACH_TIMEOUT = 2.0
# Write-behind batches in flight at most; page-outs gather meanwhile. Two keep the mirror's
# disk busy with one batch while the next travels.
WRITE_WINDOW = 2
# Seconds page-outs gather before they go to the mirror when no batch is in flight. The
# write-behind is not in the acknowledgement, so a message per page-out at low queue depth
# (the kernel's reclaim writes come 1 to 4 at a time) only woke the mirror inside each
# write's round trip to the replicas, on the same CPUs; gathered over this window they go
# together, after the replicas' requests.
WRITE_BEHIND_DELAY = 0.002


class MirrorFailure(Exception):
    """The mirror did not serve a request: error reply, timeout, or the link is down."""


class MirrorLink(Link[MirrorReply]):
    """One DEALER to `remem mirror`, the bounded write cache, and mirror state."""

    peer = "mirror"
    reply_adapter = MIRROR_REPLY_ADAPTER
    hwm = 4 * MAX_IN_FLIGHT

    def __init__(
        self,
        endpoint: str,
        *,
        context: zmq.Context[zmq.Socket[bytes]],
        cache_bytes: int,
        timeout: float,
        malformed: MalformedReplies | None = None,
        security: Security | None = None,
        server_key: str | None = None,
    ) -> None:
        # The requests waiting are kept across reconnections: ids stay unique, so a reply to
        # the old connection's request is never taken for the new one's.
        super().__init__(
            endpoint, context, timeout, malformed, security, server_key, name="the mirror"
        )
        self.cache_limit = max(cache_bytes, MAX_MIRROR_PAGES * PAGE_SIZE)
        # entry id -> (first page, count, data) of writes the mirror has not confirmed; dict
        # order is the order the mirror applies them (gathered entries are sent first).
        self._cache: dict[int, tuple[int, int, bytes]] = {}
        self._entry_ids = itertools.count(1)
        self.cache_bytes = 0
        # Entries written behind but not sent yet, their pages, and whether a send is due.
        self._gathered: list[int] = []
        self._gathered_pages = 0
        self._flush_due = False
        # msg_id -> the cache entries a write request in flight carries.
        self._carried: dict[int, list[int]] = {}
        self._behind_in_flight: set[int] = set()  # msg_ids of write-behind batches
        self._room = asyncio.Event()
        self._room.set()
        # False after a timeout, until the mirror answers again.
        self.up = True
        # The mirror may miss acknowledged writes: unknown until attached, a session that did
        # not end cleanly, or a timeout with writes in flight. It must not serve page-ins
        # (but its mirror-only pages) until rebuilt.
        self.incomplete = True
        # Times the mirror was lost or failed a write: a rebuild that saw this change while it
        # ran cannot vouch for the mirror.
        self.losses = 0
        self._down_since = 0.0
        self.written_bytes = 0
        self.pages_read = 0
        self.failures = 0
        self._dealer: Dealer | None = None
        self._open_socket()
        self.closed = False

    # -- socket ----------------------------------------------------------------------------

    def _open_socket(self) -> None:
        self._dealer = self._open_dealer()

    def _close_socket(self) -> None:
        if self._dealer is not None:
            self._dealer.close()
            self._dealer = None

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._fail_all("link closed")
        self._close_socket()

    # -- state -----------------------------------------------------------------------------

    @property
    def serves_reads(self) -> bool:
        """The mirror can serve page-ins: reachable and holding every write."""
        return self.up and not self.incomplete and not self.closed

    def usable(self) -> bool:
        """Worth sending to: up, or down long enough to try again."""
        if self.closed:
            return False
        if self.up:
            return True
        if time.monotonic() - self._down_since >= RETRY_AFTER:
            # A fresh socket drops whatever the old one still queued toward the dead peer.
            self._close_socket()
            self._open_socket()
            self.up = True
            log.info("trying the mirror again endpoint=%s", self.endpoint)
            # Attach first on the new connection: a mirror that was only stalled then refuses
            # what the old connection still had queued there, which would otherwise land
            # after this connection's requests (a rebuild's copy of the same pages). The
            # reply changes nothing here: this session's state is the link's own.
            try:
                reattach = self._transmit(AttachMirrorRequest(msg_id=self._next_id()))
            except MirrorFailure as exc:
                self._lost(str(exc))
                return False
            reattach.add_done_callback(consume_outcome)
            return True
        return False

    # -- requests --------------------------------------------------------------------------

    def _send(self, msg: Any, *payload: Any) -> asyncio.Future[Any]:
        """Send a request after every page-out gathered before it (the mirror keeps order)."""
        if self._gathered:
            self._send_gathered()
        return self._transmit(msg, *payload)

    def _transmit(self, msg: Any, *payload: Any) -> asyncio.Future[Any]:
        if self.closed or self._dealer is None:
            raise MirrorFailure("mirror link closed")
        try:
            self._dealer.send(encode(msg, *payload))
        except DealerBusy as exc:
            raise MirrorFailure(f"send failed: {exc}") from exc
        future: asyncio.Future[Any] = self._loop.create_future()
        self._pending.add(msg.msg_id, future)
        return future

    async def _call(self, msg: Any, *payload: Any) -> Any:
        if not self.usable():
            raise MirrorFailure("the mirror is not answering")
        return await self._send(msg, *payload)

    async def attach(self) -> AttachMirrorReply:
        """Start the session; the link is complete if the mirror's last session ended
        cleanly."""
        reply = await self._call(AttachMirrorRequest(msg_id=self._next_id()))
        assert isinstance(reply, AttachMirrorReply)
        self.incomplete = not reply.complete
        return reply

    async def detach(self) -> bool:
        """End the session cleanly if the mirror holds every write; returns whether it did
        (the mirror then trusts itself at the next attach)."""
        if self.incomplete or self.closed or not self.up:
            return False
        detached = self._call(DetachMirrorRequest(msg_id=self._next_id()))
        try:
            await asyncio.wait_for(detached, DETACH_TIMEOUT)
        except TimeoutError:
            raise MirrorFailure(f"no answer in {DETACH_TIMEOUT}s") from None
        return not self.incomplete  # a write sent before the detach may have failed

    async def barrier(self) -> None:
        """Return once the mirror executed every request sent before (it runs them in
        order): a describe, answered after them."""
        await self._call(DescribeMirrorRequest(msg_id=self._next_id()))

    async def list_unreplicated(self) -> tuple[ListUnreplicatedReply, bytes]:
        future = self._send(ListUnreplicatedRequest(msg_id=self._next_id()))
        reply, payload = await future
        return reply, payload

    async def wait_for_room(self, nbytes: int) -> None:
        """Return once the write cache can take `nbytes` more and a request can be sent."""
        while (self.cache_bytes and self.cache_bytes + nbytes > self.cache_limit) or len(
            self._pending
        ) >= MAX_IN_FLIGHT:
            self._room.clear()
            await self._room.wait()

    def write_behind(self, first: int, pages: PageArray) -> Awaitable[None]:
        """Queue pages for the mirror; awaited, returns once they are in the write cache.

        A page-out that need not wait (most) is queued now, with no coroutine."""
        count = pages.shape[0]
        if (
            count <= MAX_MIRROR_PAGES
            and self.up
            and not self.closed
            and not (self.cache_bytes and self.cache_bytes + count * PAGE_SIZE > self.cache_limit)
            and len(self._pending) < MAX_IN_FLIGHT
        ):
            self.queue_write(first, pages.tobytes())
            return _QUEUED
        return self._write_behind(first, pages)

    async def _write_behind(self, first: int, pages: PageArray) -> None:
        if not self.usable():
            self._missed()
            return
        count = pages.shape[0]
        for start in range(0, count, MAX_MIRROR_PAGES):
            n = min(MAX_MIRROR_PAGES, count - start)
            await self.wait_for_room(n * PAGE_SIZE)
            if not self.up:
                self._missed()
                return
            self.queue_write(first + start, pages[start : start + n].tobytes())

    def queue_write(self, first: int, data: bytes) -> None:
        """Gather a run of at most MAX_MIRROR_PAGES pages for the next write request, now
        (no wait: ordered before any later request; the caller made room)."""
        n = len(data) // PAGE_SIZE
        assert 1 <= n <= MAX_MIRROR_PAGES and self.up
        self._gathered.append(self._cached(first, n, data))
        self._gathered_pages += n
        if self._gathered_pages + MAX_MIRROR_PAGES > MAX_MIRROR_BATCH_PAGES:
            self._send_gathered()  # the next page-out might not fit
        elif not self._flush_due and len(self._behind_in_flight) < WRITE_WINDOW:
            # Send with the page-outs of the next WRITE_BEHIND_DELAY.
            self._flush_due = True
            self._loop.call_later(WRITE_BEHIND_DELAY, self._flush_gathered)

    def _cached(self, first: int, count: int, data: bytes) -> int:
        """Put a write's pages in the write cache; returns their entry id."""
        entry = next(self._entry_ids)
        self._cache[entry] = (first, count, data)
        self.cache_bytes += len(data)
        return entry

    def _flush_gathered(self) -> None:
        self._flush_due = False
        if self._gathered and not self.closed and len(self._behind_in_flight) < WRITE_WINDOW:
            self._send_gathered()

    def _send_gathered(self) -> None:
        """Send the gathered page-outs as one request (a write_pages if only one)."""
        entries, self._gathered = self._gathered, []
        count, self._gathered_pages = self._gathered_pages, 0
        runs = [self._cache[entry][:2] for entry in entries]
        msg: WritePagesRequest | WriteExtentsRequest
        if len(entries) == 1:
            msg = WritePagesRequest(msg_id=self._next_id(), first_page=runs[0][0], count=count)
            payload: tuple[Any, ...] = (self._cache[entries[0]][2],)
        else:
            msg = WriteExtentsRequest(msg_id=self._next_id(), extents=len(entries), count=count)
            data = b"".join(self._cache[entry][2] for entry in entries)
            payload = (pack_extents(runs), data)
        try:
            future = self._transmit(msg, *payload)
        except MirrorFailure as exc:
            self._lost(str(exc))
            return
        self._carried[msg.msg_id] = entries
        self._behind_in_flight.add(msg.msg_id)
        future.add_done_callback(consume_outcome)

    async def write_durable(self, first: int, pages: PageArray) -> None:
        """Write pages as mirror-only (unreplicated), returning once they are on disk.

        Allowed on an incomplete mirror: these pages are read from it alone afterwards."""
        if not self.usable():
            raise MirrorFailure("the mirror is not answering")
        count = pages.shape[0]
        futures = []
        for start in range(0, count, MAX_MIRROR_PAGES):
            n = min(MAX_MIRROR_PAGES, count - start)
            data = pages[start : start + n].tobytes()
            msg = WritePagesRequest(
                msg_id=self._next_id(),
                first_page=first + start,
                count=n,
                replicated=False,
                sync=True,
            )
            futures.append(self._send(msg, data))
            self._carried[msg.msg_id] = [self._cached(first + start, n, data)]
        for future in futures:
            await future

    async def read(self, first: int, count: int, *, mirror_only: bool = False) -> PageArray:
        """Pages [first, first + count) as the mirror and the write cache hold them.

        `mirror_only`: the caller keeps only pages the mirror alone holds (written durably),
        which an incomplete mirror may serve too."""
        if self.closed or not self.up or (self.incomplete and not mirror_only):
            raise MirrorFailure("the mirror is down or missed writes")
        out = np.empty((count, PAGE_SIZE), dtype=np.uint8)
        futures = []
        for start in range(0, count, MAX_MIRROR_PAGES):
            n = min(MAX_MIRROR_PAGES, count - start)
            msg = ReadPagesRequest(msg_id=self._next_id(), first_page=first + start, count=n)
            futures.append((start, n, self._send(msg)))
        for start, n, future in futures:
            _reply, payload = await future
            out[start : start + n] = np.frombuffer(payload, dtype=np.uint8).reshape(n, PAGE_SIZE)
        self.pages_read += count
        # Writes still in flight (sent after the read, or not yet confirmed): newest wins.
        for cached_first, cached_count, data in list(self._cache.values()):
            lo = max(first, cached_first)
            hi = min(first + count, cached_first + cached_count)
            if lo < hi:
                rows = np.frombuffer(data, dtype=np.uint8).reshape(cached_count, PAGE_SIZE)
                out[lo - first : hi - first] = rows[lo - cached_first : hi - cached_first]
        return out

    def trim(self, first: int, count: int) -> None:
        """Make the pages read as zeros on the mirror (ordered after earlier writes)."""
        # Cached writes of these pages must not be overlaid on later reads.
        self._forget_cached(first, count)
        self._change(TrimPagesRequest(msg_id=self._next_id(), first_page=first, count=count))

    async def mark_replicated(self, first: int, count: int) -> None:
        """Tell the mirror the pages are on their replicas again (after a resync)."""
        if not self.usable():
            raise MirrorFailure("the mirror is not answering")
        msg = MarkReplicatedRequest(msg_id=self._next_id(), first_page=first, count=count)
        future = self._send(msg)
        self._carried[msg.msg_id] = []  # a change: see _change
        await future

    def clear_unreplicated(self, first: int, count: int) -> None:
        """`mark_replicated` nobody waits for (ordered after earlier writes, like a trim)."""
        self._change(MarkReplicatedRequest(msg_id=self._next_id(), first_page=first, count=count))

    def _change(self, msg: TrimPagesRequest | MarkReplicatedRequest) -> None:
        """Send a trim or mark nobody waits for, ordered after earlier writes.

        Its loss shows as a timeout of the link, which knows a change was in flight
        (carried) and makes the copy incomplete: a trim the mirror never applied leaves old
        data, a mark a page marked mirror-only that a restarted client would serve from it.
        One not sent at all (the mirror is down, or the send failed) does so at once; a
        failed send is never its caller's error."""
        if not self.usable():
            self._missed()
            return
        try:
            future = self._send(msg)
        except MirrorFailure as exc:
            self._missed()
            self._lost(str(exc))
            return
        self._carried[msg.msg_id] = []
        future.add_done_callback(consume_outcome)

    def _forget_cached(self, first: int, count: int) -> None:
        for entry, (cached_first, cached_count, data) in list(self._cache.items()):
            if cached_first < first + count and first < cached_first + cached_count:
                # Keep the bytes accounted (they are still in flight) but overlay zeros.
                zero = bytearray(data)
                lo = max(first, cached_first) - cached_first
                hi = min(first + count, cached_first + cached_count) - cached_first
                zero[lo * PAGE_SIZE : hi * PAGE_SIZE] = bytes((hi - lo) * PAGE_SIZE)
                self._cache[entry] = (cached_first, cached_count, bytes(zero))

    # -- replies ---------------------------------------------------------------------------

    def _on_reply(self, frames: list[Any]) -> None:
        if self.closed:
            return
        # The answer to a write, in the mirror's own form, is read without pydantic
        # (`parse_write_pages_reply`); any other message is validated (and, if malformed,
        # counted) by the table.
        parsed = (
            parse_write_pages_reply(frames[1]) if len(frames) == 2 and not len(frames[0]) else None
        )
        if parsed is not None:
            parent_id = parsed[0]
            written_future = self._pending.take_answered(parent_id)
            if written_future is None:
                return  # late (counted)
            self._answered(parent_id, failed=False)
            if not written_future.done():
                # Nobody reads a write's reply (its writers only wait for it).
                written_future.set_result(None)
            return
        taken = self._pending.take(frames)
        if taken is None:
            # Malformed, or late: the mirror was lost meanwhile, and losing it dropped every
            # request in flight with its carried entries (counted).
            return
        reply, payload, future = taken
        carried = self._answered(reply.parent_id, failed=isinstance(reply, ErrorReply))
        if future.done():
            return
        if isinstance(reply, ErrorReply):
            self.failures += 1
            log.warning("mirror refused a request: %s %s", reply.error_code, reply.detail)
            if carried is not None:
                # A write the mirror could not store: its copy is no longer complete.
                self.incomplete = True
                self.losses += 1
            future.set_exception(MirrorFailure(f"{reply.error_code}: {reply.detail}"))
        elif isinstance(reply, ReadPagesReply | ListUnreplicatedReply):
            if len(payload) != 1:
                future.set_exception(MirrorFailure("reply without its data frame"))
                return
            data = bytes(memoryview(payload[0]))
            if isinstance(reply, ReadPagesReply) and len(data) != reply.count * PAGE_SIZE:
                future.set_exception(MirrorFailure("read reply of the wrong length"))
                return
            future.set_result((reply, data))
        else:
            future.set_result(reply)

    def _answered(self, parent_id: int, *, failed: bool) -> list[int] | None:
        """Request `parent_id` was answered: its carried entries leave the write cache, and
        what gathered meanwhile may go; returns those entries (None: it carried none)."""
        carried = self._carried.pop(parent_id, None)
        for cache_entry in carried or ():
            cached = self._cache.pop(cache_entry, None)
            if cached is not None:
                self.cache_bytes -= len(cached[2])
                if not failed:
                    self.written_bytes += len(cached[2])
        if parent_id in self._behind_in_flight:
            self._behind_in_flight.discard(parent_id)
            if self._gathered and not self._flush_due:
                self._send_gathered()  # what gathered while the window was full
        self._room.set()
        return carried

    def _expired(self, future: asyncio.Future[Any]) -> None:
        """A request went unanswered for `timeout` seconds: the mirror is lost."""
        why = f"no answer in {self.timeout}s"
        self._lost(why)
        if not future.done():
            future.set_exception(MirrorFailure(why))

    def _disconnected(self) -> None:
        """The connection to the mirror is lost (it died, or is restarting): nothing sent
        on it will be answered, so it is lost as after a timeout, only sooner."""
        if self.up:  # else lost already: the link tries a fresh socket after RETRY_AFTER
            self._lost("connection lost")

    def _missed(self) -> None:
        """A write or trim was not sent (the mirror is down): its copy is not complete."""
        self.incomplete = True
        self.losses += 1

    def _lost(self, why: str) -> None:
        """The mirror stopped answering: fail what is in flight, free the cache."""
        self.failures += 1
        self.losses += 1
        if self._cache or self._carried:  # writes or trims the mirror may not have applied
            self.incomplete = True
        if self.up:
            log.error("mirror lost endpoint=%s: %s", self.endpoint, why)
        self.up = False
        self._down_since = time.monotonic()
        self._fail_all(why)

    def _fail_all(self, why: str) -> None:
        self._pending.fail_all(lambda: MirrorFailure(why))
        self._cache.clear()
        self._carried.clear()
        self._behind_in_flight.clear()
        self._gathered, self._gathered_pages = [], 0
        self.cache_bytes = 0
        self._room.set()


class _Queued:
    """An awaitable that is done at once (`write_behind` that did not wait)."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, None]:
        return
        yield  # a generator that is done at its first step


_QUEUED = _Queued()


def consume_outcome(future: asyncio.Future[Any]) -> None:
    """Done-callback of a request nobody awaits: its failure is handled elsewhere (the link
    marks the mirror lost), so only retrieve it, and log it for debugging."""
    if not future.cancelled() and future.exception() is not None:
        log.debug("background mirror request failed: %s", future.exception())

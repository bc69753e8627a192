"""Asyncio links from the client to page servers: one DEALER per server, batched per callback.

Every page operation the remote backend starts during one socket callback (the NBD
connection's, for the requests it received; a link's, for what the replies it resolved
start) is gathered into one message per server and operation (a GET of 32 single-page NBD
reads is one `get_pages_request` of 32 keys), sent when that callback ends
(`inline.CallbackEnd`; outside one, when the loop turn ends). Replies are matched by
`parent_id` and resolve one future per batch, not per page: for a GET an
`inline.InlineFuture`, so the reads waiting on it resume in the reply's callback and their
NBD replies go out as it ends. The page server's own form of a GET or PUT reply header is
read without pydantic (`parse_get_pages_reply`, `parse_put_pages_reply`); any other reply is
validated by the models, as before.

The link is a `dealer.Dealer` (ZMTP from the event loop when plaintext, libzmq for Curve)
and a `dealer.PendingRequests`: no coroutine or future per message beyond the batch's own.
A batch that gets no answer within `timeout` fails with `ReplicaFailure`; the backend then
tries another replica. So do the batches in flight when the connection is lost (the server
was killed or restarted): at once, not after the timeout; and until the link is connected
again (a restarted server comes back on the same endpoint), new batches fail as they are
sent.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from remem_common.framing import DELIMITER
from remem_common.pageserver_client import REPLY_ADAPTER, AnyReply
from remem_common.protocol.client_pageserver import (
    DeletePagesRequest,
    GetPagesReply,
    GetPagesRequest,
    PutPagesReply,
    PutPagesRequest,
    page_request_header_encoder,
    parse_get_pages_reply,
    parse_put_pages_reply,
)
from remem_common.protocol.envelope import ErrorCode, ErrorReply
from remem_common.protocol.pages import (
    KEY_DTYPE,
    MAX_BATCH_PAGES,
    PAGE_SIZE,
    SEAL_BYTES,
    KeyArray,
    PageArray,
    U32Array,
    unpack_crcs,
    unpack_pages,
    unpack_seals,
)
from remem_common.security import Security

from remem_client.dealer import DealerBusy, Link
from remem_client.inline import InlineFuture, callback_end

if TYPE_CHECKING:
    import zmq

    from remem_client.metrics import MalformedReplies

log = logging.getLogger("client.links")
_REQUEST_TYPE = {
    "get": GetPagesRequest.model_fields["type"].default,
    "put": PutPagesRequest.model_fields["type"].default,
    "delete": DeletePagesRequest.model_fields["type"].default,
}
# Batches a link keeps in flight to one server; requests that arrive meanwhile wait in the open
# batches and leave together when a reply frees a place. A ZeroMQ round trip costs ~60 us of
# CPU on each side on these VMs whatever its size, so at queue depth 32 this is what turns 32
# messages of one page into a few of many (a 4 KiB randread batch grew from ~4 pages to ~16).
WINDOW = 1
# Keep at most this many messages queued toward a server that is not reading: past it, sends
# fail at once rather than buffering pages without bound.
SEND_HWM = 256
# Spans of fewer pages than this are kept by page in a batch (see _Batch).
_SHORT_SPAN = 8


class ReplicaFailure(Exception):
    """A page server did not serve a batch: error reply, timeout or link closed."""

    def __init__(self, server_id: str, code: ErrorCode | str, detail: str) -> None:
        super().__init__(f"{server_id}: {code}: {detail}")
        self.server_id = server_id
        self.code = code
        self.detail = detail


@dataclass(slots=True, eq=False)
class GetResult:
    """One GET batch's answer; a request reads its rows [start, start + count).

    Holds the reply's frames as memoryviews (no copy); numpy views are made only when a
    caller asks, so the small-read fast path never touches numpy.
    """

    count: int
    found_raw: memoryview
    crc_raw: memoryview
    data_raw: memoryview
    seal_raw: memoryview

    @property
    def found(self) -> np.ndarray[Any, np.dtype[np.bool_]]:
        return np.frombuffer(self.found_raw, dtype=np.uint8).view(np.bool_)

    @property
    def crcs(self) -> U32Array:
        return unpack_crcs(self.crc_raw, self.count)

    @property
    def data(self) -> PageArray:
        return unpack_pages(self.data_raw, self.count)

    @property
    def seals(self) -> PageArray:
        return unpack_seals(self.seal_raw, self.count)


@dataclass(slots=True)
class _Batch:
    """Pages gathered for one message: key, checksum, data and seal arrays from several
    callers."""

    op: str
    # Contiguous buffers: numpy arrays from the general path, bytes from the fast path.
    keys: list[Any] = field(default_factory=list)
    crcs: list[Any] = field(default_factory=list)
    data: list[Any] = field(default_factory=list)
    seals: list[Any] = field(default_factory=list)
    count: int = 0
    future: asyncio.Future[Any] | None = None
    # Global page numbers touched: a page may appear only once in a message, so a caller
    # whose span overlaps one already gathered starts a new batch. Short spans (most: a
    # 4 KiB request is one page) as a set of their pages, checked with a lookup a page;
    # longer ones as (first, last).
    pages: set[int] = field(default_factory=set)
    spans: list[tuple[int, int]] = field(default_factory=list)

    def overlaps(self, first: int, last: int) -> bool:
        pages = self.pages
        if last - first < _SHORT_SPAN:
            for page in range(first, last + 1):
                if page in pages:
                    return True
        elif pages and any(first <= page <= last for page in pages):
            return True
        return bool(self.spans) and any(
            first <= other_last and other_first <= last for other_first, other_last in self.spans
        )

    def touch(self, first: int, last: int) -> None:
        if last - first < _SHORT_SPAN:
            self.pages.update(range(first, last + 1))
        else:
            self.spans.append((first, last))


class PageServerLink(Link[AnyReply]):
    """The client's connection to one page server."""

    peer = "pageserver"
    reply_adapter = REPLY_ADAPTER
    hwm = SEND_HWM
    # A batch sent while the connection is lost fails at once: the backend tries another
    # replica instead of waiting for this one.
    refuse_while_reconnecting = True

    def __init__(
        self,
        server_id: str,
        endpoint: str,
        *,
        context: zmq.Context[zmq.Socket[bytes]],
        tenant: str,
        volume: int,
        timeout: float,
        malformed: MalformedReplies | None = None,
        security: Security | None = None,
        server_key: str | None = None,
    ) -> None:
        super().__init__(
            endpoint, context, timeout, malformed, security, server_key, name=server_id
        )
        self.server_id = server_id
        self.tenant = tenant
        self.volume = volume
        self._headers = {
            op: page_request_header_encoder(type_name, tenant, volume)
            for op, type_name in _REQUEST_TYPE.items()
        }
        self._dealer = self._open_dealer()
        self._open: dict[str, _Batch] = {}
        self._flush_scheduled = False
        self._end = callback_end(self._loop)
        self.closed = False

    # -- public operations: each returns the future of the batch the pages joined ----------

    def submit_get(self, keys: Any, first: int, last: int) -> tuple[asyncio.Future[GetResult], int]:
        """Read pages; the future's GetResult holds this caller's rows from the second value."""
        batch, start = self._join("get", keys, None, None, None, first, last)
        assert batch.future is not None
        return batch.future, start

    def submit_put(
        self,
        keys: KeyArray,
        crcs: U32Array,
        data: PageArray,
        seals: PageArray,
        first: int,
        last: int,
    ) -> asyncio.Future[Any]:
        """Store pages (all or nothing on this server); the future gives how many."""
        batch, _ = self._join("put", keys, crcs, data, seals, first, last)
        assert batch.future is not None
        return batch.future

    def submit_delete(self, keys: Any, first: int, last: int) -> asyncio.Future[Any]:
        """Free pages (trim)."""
        batch, _ = self._join("delete", keys, None, None, None, first, last)
        assert batch.future is not None
        return batch.future

    def gathering(self, op: str) -> bool:
        """Whether a batch of `op` is open (not sent yet): a caller may join it."""
        return op in self._open

    def close(self) -> None:
        """Fail everything outstanding and close the socket."""
        if self.closed:
            return
        self.closed = True
        self._dealer.close()
        self._pending.fail_all(self._closed_failure)
        for batch in self._open.values():
            if batch.future is not None and not batch.future.done():
                batch.future.set_exception(self._closed_failure())
        self._open.clear()

    def _closed_failure(self) -> ReplicaFailure:
        return ReplicaFailure(self.server_id, "closed", "link closed")

    # -- batching --------------------------------------------------------------------------

    def _join(
        self,
        op: str,
        keys: Any,
        crcs: Any,
        data: Any,
        seals: Any,
        first: int,
        last: int,
    ) -> tuple[_Batch, int]:
        if self.closed:
            raise ReplicaFailure(self.server_id, "closed", "link closed")
        count = memoryview(keys).nbytes // KEY_DTYPE.itemsize
        batch = self._open.get(op)
        if batch is not None and (
            batch.count + count > MAX_BATCH_PAGES or batch.overlaps(first, last)
        ):
            self._send(self._open.pop(op))
            batch = None
        if batch is None:
            # A GET's readers resume in the reply's callback (`inline`); a PUT's writer
            # waits for every replica, so it resumes once, on the loop, when the last
            # replies came (resumed at each reply, it waited once more a write).
            future: asyncio.Future[Any] = (
                InlineFuture(self._loop) if op == "get" else self._loop.create_future()
            )
            batch = _Batch(op=op, future=future)
            self._open[op] = batch
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self._end.defer(self._flush)
        start = batch.count
        batch.keys.append(keys)
        if crcs is not None and data is not None:
            batch.crcs.append(crcs)
            batch.data.append(data)
            batch.seals.append(seals)
        batch.count += count
        batch.touch(first, last)
        return batch, start

    def _flush(self) -> None:
        """Send the open batches, as many as the window has room for (oldest first); the
        rest go when a reply, a timeout or a full batch makes room."""
        self._flush_scheduled = False
        while self._open and len(self._pending) < WINDOW:
            op = next(iter(self._open))
            self._send(self._open.pop(op))

    def _send(self, batch: _Batch) -> None:
        assert batch.future is not None
        try:
            self._send_batch(batch, batch.future)
        except Exception as exc:  # a bug here must fail the callers, not leave them waiting
            log.exception("cannot send a %s batch to %s", batch.op, self.server_id)
            if not batch.future.done():
                batch.future.set_exception(
                    ReplicaFailure(self.server_id, ErrorCode.INTERNAL, f"send failed: {exc}")
                )

    def _send_batch(self, batch: _Batch, future: asyncio.Future[Any]) -> None:
        msg_id = self._next_id()
        keys = batch.keys[0] if len(batch.keys) == 1 else b"".join(batch.keys)
        crcs_data: list[Any] = []
        if batch.op == "put":
            # b"".join takes any contiguous buffer: numpy arrays and bytes alike.
            crcs = batch.crcs[0] if len(batch.crcs) == 1 else b"".join(batch.crcs)
            data = batch.data[0] if len(batch.data) == 1 else b"".join(batch.data)
            seals = batch.seals[0] if len(batch.seals) == 1 else b"".join(batch.seals)
            crcs_data = [crcs, data, seals]
        header = self._headers[batch.op](msg_id, batch.count)
        frames = [DELIMITER, header, keys, *crcs_data]
        try:
            self._dealer.send(frames)
        except DealerBusy as exc:
            future.set_exception(
                ReplicaFailure(self.server_id, ErrorCode.UNAVAILABLE, f"send failed: {exc}")
            )
            return
        self._pending.add(msg_id, future)

    def _expired(self, future: asyncio.Future[Any]) -> None:
        """A batch went unanswered for `timeout` seconds."""
        failure = ReplicaFailure(self.server_id, "timeout", f"no answer in {self.timeout}s")
        if not future.done():
            future.set_exception(failure)
        # The batches waiting for room would wait a whole timeout more on a server that has
        # stopped answering: fail them now, so their callers fail over at once.
        self._fail_open(failure)

    def _disconnected(self) -> None:
        """The connection to the server is lost: what was sent on it will never be answered.
        Fail it now, and the batches waiting for room (sent now, they would be refused)."""
        self._pending.fail_all(self._lost_failure)
        self._fail_open(self._lost_failure())

    def _lost_failure(self) -> ReplicaFailure:
        return ReplicaFailure(self.server_id, ErrorCode.UNAVAILABLE, "connection lost")

    def _fail_open(self, failure: ReplicaFailure) -> None:
        for batch in self._open.values():
            if batch.future is not None and not batch.future.done():
                batch.future.set_exception(failure)
        self._open.clear()

    # -- replies ---------------------------------------------------------------------------

    def _on_reply(self, frames: list[Any]) -> None:
        if self.closed:
            return
        # A GET's or PUT's answer in the page server's own form is read without pydantic
        # (`parse_get_pages_reply`, `parse_put_pages_reply`); any other message is validated
        # (and, if malformed, counted) by the table.
        parsed = None
        if not len(frames[0]):
            if len(frames) == 6:
                parsed = parse_get_pages_reply(frames[1])
            elif len(frames) == 2:
                parsed = parse_put_pages_reply(frames[1])
        if parsed is None:
            self._on_validated_reply(frames)
            return
        parent_id, count = parsed
        future = self._pending.take_answered(parent_id)
        if future is None:
            return  # answered after its timeout (counted)
        self._made_room()
        if future.done():
            return
        if len(frames) == 6:
            self._get_result(future, count, frames[2:])
        else:
            self._resolve(future, count)  # a PUT's: the number of pages stored

    def _on_validated_reply(self, frames: list[Any]) -> None:
        taken = self._pending.take(frames)
        if taken is None:
            return  # malformed, or answered after its timeout (counted)
        reply, payload, future = taken
        self._made_room()
        if future.done():
            return
        if isinstance(reply, ErrorReply):
            future.set_exception(ReplicaFailure(self.server_id, reply.error_code, reply.detail))
        elif isinstance(reply, GetPagesReply):
            self._get_result(future, reply.count, payload)
        elif isinstance(reply, PutPagesReply):
            self._resolve(future, reply.stored)  # as `_on_reply` resolves it
        else:
            self._resolve(future, reply)

    def _made_room(self) -> None:
        """A batch was answered: what gathered while it was away leaves (at the end of
        this callback)."""
        if self._open and not self._flush_scheduled:
            self._flush_scheduled = True
            self._end.defer(self._flush)

    def _get_result(self, future: asyncio.Future[Any], count: int, payload: list[Any]) -> None:
        if len(payload) == 4:
            found, crcs, data, seals = (
                memoryview(payload[0]),
                memoryview(payload[1]),
                memoryview(payload[2]),
                memoryview(payload[3]),
            )
            if (
                found.nbytes == count
                and crcs.nbytes == 4 * count
                and data.nbytes == PAGE_SIZE * count
                and seals.nbytes == SEAL_BYTES * count
            ):
                self._resolve(future, GetResult(count, found, crcs, data, seals))
                return
        future.set_exception(
            ReplicaFailure(self.server_id, ErrorCode.MALFORMED, "bad get reply lengths")
        )

    def _resolve(self, future: asyncio.Future[Any], result: Any) -> None:
        """Hand a batch its answer: the requests waiting on it resume now, in this callback,
        and what they send or reply goes out when it ends (`inline`)."""
        if not isinstance(future, InlineFuture):
            future.set_result(result)
            return
        end = self._end
        end.enter()
        try:
            future.resolve_inline(result)
        finally:
            end.exit()


def page_keys(first_page: int, count: int, slab_pages: int) -> KeyArray:
    """Keys of `count` consecutive device pages starting at global page `first_page`."""
    pages = np.arange(first_page, first_page + count, dtype=np.uint64)
    keys = np.empty(count, dtype=KEY_DTYPE)
    keys["slab"] = pages // slab_pages
    keys["page"] = pages % slab_pages
    return keys


__all__ = ["PAGE_SIZE", "GetResult", "PageServerLink", "ReplicaFailure", "page_keys"]

"""The mirror's ZeroMQ loop and its writer thread: validate, queue in order, write, answer.

Two threads, one job each:

- the main thread owns the ROUTER socket: it validates each request, queues it, and sends the
  replies the writer hands back. ZeroMQ sockets are not thread-safe, so the writer never
  touches one: replies go through a deque and an eventfd that the main loop polls beside the
  ROUTER.
- the writer thread owns the store and executes the queue strictly in order. Reads, trims and
  bitmap requests go through the same FIFO as writes, so each sees every write queued before
  it, and a later write of a page lands after an earlier one.

The writer takes greedily what is queued: consecutive writes (up to MAX_RUN_PAGES pages) form
one group, whose runs of adjacent pages go out in one pwrite each, with one fdatasync if any
write asked for `sync`; replies follow once the group is on disk. Anything else is one op.

Back-pressure: while more than `queue_pages` written pages (or that many requests) wait, the
main loop stops reading the ROUTER; ZeroMQ's queues and then the client's sends block. Nothing
is ever dropped.

`start` assembles the service from its config for `remem_common.lifecycle.run_service`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq
from prometheus_client import REGISTRY
from remem_common.config import bind_address
from remem_common.framing import decode, encode, split_routing
from remem_common.lifecycle import Lifecycle, Servable, ServiceFailure, Started
from remem_common.protocol.client_mirror import (
    MIRROR_REQUEST_ADAPTER,
    PAYLOAD_FRAMES,
    AttachMirrorReply,
    AttachMirrorRequest,
    DescribeMirrorReply,
    DescribeMirrorRequest,
    DetachMirrorReply,
    DetachMirrorRequest,
    ListUnreplicatedReply,
    ListUnreplicatedRequest,
    MarkReplicatedReply,
    MarkReplicatedRequest,
    MirrorRequest,
    ReadPagesReply,
    ReadPagesRequest,
    TrimPagesReply,
    TrimPagesRequest,
    WriteExtentsRequest,
    WritePagesReply,
    WritePagesRequest,
    unpack_extents,
)
from remem_common.protocol.envelope import (
    MALFORMED_REASONS,
    ErrorCode,
    ErrorReply,
    ProtocolError,
)
from remem_common.protocol.pages import PAGE_SIZE
from remem_common.security import Role, Security
from remem_common.wire import recv_frames

from remem_mirror.config import MirrorConfig
from remem_mirror.metrics import MirrorGauges, MirrorMetrics
from remem_mirror.store import MAX_RUN_PAGES, MirrorStore, MirrorStoreError, plan_runs

# The roles whose keys the mirror admits (with Curve): the client it mirrors.
ADMITTED_ROLES: tuple[Role, ...] = ("client",)

log = logging.getLogger("mirror")

Frames = list[Any]

OP_OF = {
    "describe_mirror_request": "describe",
    "attach_mirror_request": "attach",
    "detach_mirror_request": "detach",
    "write_pages_request": "write",
    "write_extents_request": "write",
    "read_pages_request": "read",
    "trim_pages_request": "trim",
    "mark_replicated_request": "mark_replicated",
    "list_unreplicated_request": "list_unreplicated",
}
# Requests that change the mirror (and attach, which starts a session): a superseded
# connection's are refused (see MirrorWriter._fence).
SESSION_OPS = frozenset(
    {
        "attach_mirror_request",
        "detach_mirror_request",
        "write_pages_request",
        "write_extents_request",
        "trim_pages_request",
        "mark_replicated_request",
    }
)
# Messages taken from the ROUTER per wake-up before queued replies get sent.
MAX_BURST = 256
POLL_MS = 100
# Shutdown waits for the queue to empty and then this long without a new request.
QUIET_MS = 20


@dataclass(slots=True)
class Op:
    """One queued request (or, with `request` None, an error reply that keeps its place)."""

    routing: Frames
    request: MirrorRequest | None
    data: Any = None
    reply: Frames | None = None
    pages: int = 0  # written pages this op holds in the queue (0 unless a write)
    # (first page, count) of each run `data` holds, back to back: one for write_pages, the
    # request's runs for write_extents.
    runs: list[tuple[int, int]] = field(default_factory=list)
    queued_at: float = field(default_factory=time.monotonic)


def error_frames(code: ErrorCode, detail: str, parent_id: int) -> Frames:
    return encode(ErrorReply(msg_id=0, parent_id=parent_id, error_code=code, detail=detail))


def io_error_frames(exc: OSError, parent_id: int) -> Frames:
    """`unavailable` with the errno, for a failed device I/O."""
    name = errno.errorcode.get(exc.errno or 0, "?")
    detail = f"device I/O failed: errno={exc.errno} {name} ({exc.strerror})"
    return error_frames(ErrorCode.UNAVAILABLE, detail, parent_id)


class OpQueue:
    """The FIFO between the main thread (puts) and the writer (takes), bounded in pages."""

    def __init__(self, limit_pages: int) -> None:
        self.limit_pages = limit_pages
        self.pending_pages = 0  # written pages queued or being written
        self.length = 0  # ops queued or being executed
        self._ops: deque[Op] = deque()
        self._write_times: deque[float] = deque()  # queued_at of each write not yet on disk
        self._cond = threading.Condition()
        self._closed = False

    def full(self) -> bool:
        """True while the main loop must not read more requests."""
        return self.pending_pages >= self.limit_pages or self.length >= self.limit_pages

    def put(self, op: Op) -> None:
        with self._cond:
            self._ops.append(op)
            self.length += 1
            if op.pages:
                self.pending_pages += op.pages
                self._write_times.append(op.queued_at)
            self._cond.notify()

    def take(self) -> list[Op]:
        """The next group for the writer: consecutive writes, or one other op.

        Blocks while the queue is empty; returns [] once closed and empty.
        """
        with self._cond:
            while not self._ops and not self._closed:
                self._cond.wait()
            if not self._ops:
                return []
            first = self._ops.popleft()
            group = [first]
            if first.pages:
                pages = first.pages
                while self._ops and self._ops[0].pages:
                    if pages + self._ops[0].pages > MAX_RUN_PAGES:
                        break
                    nxt = self._ops.popleft()
                    pages += nxt.pages
                    group.append(nxt)
            return group

    def done(self, ops: list[Op]) -> None:
        """The writer finished `ops`: release their room in the queue."""
        with self._cond:
            self.length -= len(ops)
            for op in ops:
                if op.pages:
                    self.pending_pages -= op.pages
                    self._write_times.popleft()

    def lag(self) -> float:
        """Seconds the oldest write not yet on disk has waited (0 when none)."""
        try:
            oldest = self._write_times[0]
        except IndexError:
            return 0.0
        return max(0.0, time.monotonic() - oldest)

    def abort(self) -> list[Op]:
        """Take every op the writer has not started (shutdown past its deadline)."""
        with self._cond:
            ops = list(self._ops)
            self._ops.clear()
        self.done(ops)
        return ops

    def close(self) -> None:
        """Let the writer exit once the queue is empty."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class ReplyPipe:
    """Replies from the writer to the main thread: a deque plus an eventfd to wake poll."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._replies: deque[Frames] = deque()

    def push(self, replies: list[Frames]) -> None:
        """Writer side: hand over routed reply frames and wake the main loop."""
        self._replies.extend(replies)
        os.eventfd_write(self.fd, 1)

    def pop_all(self) -> list[Frames]:
        """Main-thread side: every reply handed over so far."""
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.fd)
        out: list[Frames] = []
        while True:
            try:
                out.append(self._replies.popleft())
            except IndexError:
                return out

    def __bool__(self) -> bool:
        return bool(self._replies)

    def close(self) -> None:
        os.close(self.fd)


class MirrorWriter:
    """Executes queued ops against the store, in order; every op gets exactly one reply."""

    def __init__(self, store: MirrorStore, metrics: MirrorMetrics) -> None:
        self.store = store
        self.metrics = metrics
        # A write, trim or mark failed since the client attached: the mirror misses it, so
        # a detach must not mark it clean.
        self.failed_since_attach = False
        # The routing id of the connection that attached last, and those that attached
        # before it: a client that timed the mirror out reconnects and attaches again, and
        # what its old connection still had queued here must not land after what the new
        # one sends (a rebuild's copy of the same pages), so it is refused.
        self.session: bytes | None = None
        self.superseded: set[bytes] = set()
        self._handlers: dict[str, Callable[[Any], Frames]] = {
            "describe_mirror_request": self._describe,
            "attach_mirror_request": self._attach,
            "detach_mirror_request": self._detach,
            "read_pages_request": self._read,
            "trim_pages_request": self._trim,
            "mark_replicated_request": self._mark_replicated,
            "list_unreplicated_request": self._list_unreplicated,
        }

    def execute(self, ops: list[Op]) -> list[Frames]:
        """Run `ops` in order; returns their replies (routing ids first), in the same order
        (refused changes of a superseded connection first)."""
        replies: list[Frames] = []
        # Only an attach changes the session, and only a superseded sender is refused.
        if self.superseded or any(
            op.request is not None and op.request.type == "attach_mirror_request" for op in ops
        ):
            ops = self._fence(ops, replies)
        index = 0
        while index < len(ops):
            stop = index
            while stop < len(ops) and ops[stop].pages:
                stop += 1
            if stop > index:
                replies.extend(self._writes(ops[index:stop]))
                index = stop
            else:
                replies.append([*ops[index].routing, *self._one(ops[index])])
                index += 1
        return replies

    def _fence(self, ops: list[Op], refused: list[Frames]) -> list[Op]:
        """Track attaches and refuse changes from superseded connections (answers go to
        `refused`); returns the ops to run."""
        kept: list[Op] = []
        for op in ops:
            msg = op.request
            sender = bytes(op.routing[0]) if op.routing else b""
            if msg is not None and msg.type in SESSION_OPS and sender not in self.superseded:
                if msg.type == "attach_mirror_request":
                    if self.session is not None and self.session != sender:
                        self.superseded.add(self.session)
                    self.session = sender
            elif msg is not None and msg.type in SESSION_OPS:
                self.metrics.error[OP_OF[msg.type]].inc()
                refused.append(
                    [
                        *op.routing,
                        *error_frames(
                            ErrorCode.UNAVAILABLE,
                            "this connection's client attached again on another one",
                            msg.msg_id,
                        ),
                    ]
                )
                continue
            kept.append(op)
        return kept

    def _one(self, op: Op) -> Frames:
        msg = op.request
        if msg is None:
            assert op.reply is not None
            return op.reply
        name = OP_OF[msg.type]
        try:
            reply = self._handlers[msg.type](msg)
        except OSError as exc:
            log.error("%s failed: %s", name, exc)
            self.metrics.error[name].inc()
            self.failed_since_attach = True
            return io_error_frames(exc, msg.msg_id)
        except Exception:
            # Never let one request stop the writer; the sender learns it failed.
            log.exception("internal error handling %s", name)
            self.metrics.error[name].inc()
            return error_frames(ErrorCode.INTERNAL, "internal error; see the log", msg.msg_id)
        self.metrics.ok[name].inc()
        return reply

    # -- writes ----------------------------------------------------------------------------

    def _writes(self, ops: list[Op]) -> list[Frames]:
        """Write a group of write ops: bitmap first, then one syscall per adjacent run."""
        failures: list[OSError | None] = [None] * len(ops)
        syncing = False
        try:
            # The unreplicated bits go to disk before the data they describe: a crash in
            # between leaves a bit set over older data (a harmless extra resync), never
            # mirror-only data without its bit.
            changed = 0
            for op in ops:
                req = op.request
                if isinstance(req, WritePagesRequest):
                    syncing |= req.sync
                    if not req.replicated:
                        changed += self.store.set_unreplicated(req.first_page, req.count)
            if changed:
                self.store.sync_bitmap()
        except OSError as exc:
            log.error("bitmap update failed: %s", exc)
            failures = [exc] * len(ops)
        else:
            self._write_runs(ops, failures)
            if syncing:
                try:
                    self.metrics.fsync_duration.observe(self.store.fdatasync())
                except OSError as exc:
                    log.error("fdatasync failed: %s", exc)
                    for index, op in enumerate(ops):
                        req = op.request
                        if isinstance(req, WritePagesRequest) and req.sync:
                            failures[index] = failures[index] or exc
        self.metrics.write_requests.inc(len(ops))
        replies: list[Frames] = []
        for op, failure in zip(ops, failures, strict=True):
            assert op.request is not None
            if failure is None:
                self.metrics.ok["write"].inc()
                reply = WritePagesReply(msg_id=0, parent_id=op.request.msg_id, written=op.pages)
                frames = encode(reply)
            else:
                self.metrics.error["write"].inc()
                self.failed_since_attach = True
                frames = io_error_frames(failure, op.request.msg_id)
            replies.append([*op.routing, *frames])
        return replies

    def _write_runs(self, ops: list[Op], failures: list[OSError | None]) -> None:
        # Every op's runs in queue order, each with its op and its bytes.
        firsts: list[int] = []
        counts: list[int] = []
        chunks: list[memoryview] = []
        owners: list[int] = []
        for index, op in enumerate(ops):
            data = memoryview(op.data).cast("B")
            offset = 0
            for first, count in op.runs:
                firsts.append(first)
                counts.append(count)
                chunks.append(data[offset : offset + count * PAGE_SIZE])
                owners.append(index)
                offset += count * PAGE_SIZE
        starts = plan_runs(firsts, counts, MAX_RUN_PAGES)
        for k, start in enumerate(starts):
            stop = starts[k + 1] if k + 1 < len(starts) else len(firsts)
            started = time.perf_counter()
            try:
                written = self.store.write_run(firsts[start], chunks[start:stop])
            except OSError as exc:
                log.error("write of pages %d.. failed: %s", firsts[start], exc)
                for owner in owners[start:stop]:
                    failures[owner] = failures[owner] or exc
                continue
            self.metrics.write_duration.observe(time.perf_counter() - started)
            self.metrics.coalesced_writes.inc()
            self.metrics.written_bytes.inc(written)

    # -- everything else -------------------------------------------------------------------

    def _description(self) -> dict[str, Any]:
        """The MirrorDescription fields of describe and attach replies."""
        return {
            "page_count": self.store.page_count,
            "path": str(self.store.path),
            "direct_io": self.store.direct_io,
            "unreplicated_pages": self.store.unreplicated_pages,
        }

    def _describe(self, msg: DescribeMirrorRequest) -> Frames:
        return encode(DescribeMirrorReply(msg_id=0, parent_id=msg.msg_id, **self._description()))

    def _attach(self, msg: AttachMirrorRequest) -> Frames:
        complete = self.store.open_session()
        self.failed_since_attach = False
        if not complete:
            log.warning(
                "client attached; the last session did not end cleanly (or the mirror is new): "
                "it rebuilds the mirror from its replicas before trusting it"
            )
        return encode(
            AttachMirrorReply(
                msg_id=0, parent_id=msg.msg_id, complete=complete, **self._description()
            )
        )

    def _detach(self, msg: DetachMirrorRequest) -> Frames:
        if self.failed_since_attach:
            log.warning("client detached, but a write failed in its session: not marked clean")
            return error_frames(
                ErrorCode.UNAVAILABLE,
                "a write failed in this session: the mirror stays not clean",
                msg.msg_id,
            )
        self.store.close_session()
        log.info("client detached cleanly: the mirror holds every write")
        return encode(DetachMirrorReply(msg_id=0, parent_id=msg.msg_id))

    def _read(self, msg: ReadPagesRequest) -> Frames:
        data = self.store.read(msg.first_page, msg.count)
        self.metrics.read_bytes.inc(len(data))
        return encode(ReadPagesReply(msg_id=0, parent_id=msg.msg_id, count=msg.count), data)

    def _trim(self, msg: TrimPagesRequest) -> Frames:
        self.store.trim(msg.first_page, msg.count)
        return encode(TrimPagesReply(msg_id=0, parent_id=msg.msg_id))

    def _mark_replicated(self, msg: MarkReplicatedRequest) -> Frames:
        self.store.clear_unreplicated(msg.first_page, msg.count)
        return encode(
            MarkReplicatedReply(
                msg_id=0, parent_id=msg.msg_id, unreplicated_pages=self.store.unreplicated_pages
            )
        )

    def _list_unreplicated(self, msg: ListUnreplicatedRequest) -> Frames:
        return encode(
            ListUnreplicatedReply(
                msg_id=0,
                parent_id=msg.msg_id,
                page_count=self.store.page_count,
                unreplicated_pages=self.store.unreplicated_pages,
            ),
            self.store.bitmap_bytes(),
        )


def validate(
    msg: MirrorRequest, payload: list[Any], page_count: int
) -> tuple[Any, list[tuple[int, int]]]:
    """Check what pydantic cannot: payload frames, the page ranges, the data length.

    Returns:
        For a write (write_pages or write_extents): its data frame and the runs of pages
        the frame holds back to back, `(first_page, count)` each; else (None, []).

    Raises:
        ProtocolError: malformed, with the metric reason.
    """
    expected = PAYLOAD_FRAMES[msg.type]
    if len(payload) != expected:
        raise ProtocolError(
            ErrorCode.MALFORMED,
            f"{msg.type} takes {expected} payload frames, got {len(payload)}",
            reason="bad_frames",
            msg_id=msg.msg_id,
        )
    if isinstance(msg, WriteExtentsRequest):
        runs = unpack_extents(payload[0], msg, page_count)
        return _check_data(msg, payload[1]), runs
    if isinstance(
        msg, WritePagesRequest | ReadPagesRequest | TrimPagesRequest | MarkReplicatedRequest
    ):
        if msg.first_page + msg.count > page_count:
            raise ProtocolError(
                ErrorCode.MALFORMED,
                f"pages {msg.first_page}..{msg.first_page + msg.count - 1} are past the end "
                f"of the mirror ({page_count} pages)",
                reason="bad_fields",
                msg_id=msg.msg_id,
            )
        if isinstance(msg, WritePagesRequest):
            return _check_data(msg, payload[0]), [(msg.first_page, msg.count)]
    return None, []


def _check_data(msg: WritePagesRequest | WriteExtentsRequest, frame: Any) -> Any:
    nbytes = memoryview(frame).nbytes
    if nbytes != msg.count * PAGE_SIZE:
        raise ProtocolError(
            ErrorCode.MALFORMED,
            f"data frame of {nbytes} bytes; {msg.count} pages take {msg.count * PAGE_SIZE}",
            reason="bad_payload",
            msg_id=msg.msg_id,
        )
    return frame


class MirrorServer:
    """Serves one mirror store on one ROUTER socket until asked to stop."""

    def __init__(
        self,
        store: MirrorStore,
        metrics: MirrorMetrics,
        context: zmq.Context[zmq.Socket[bytes]],
        *,
        queue_pages: int,
        drain_timeout: float,
        security: Security | None = None,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.drain_timeout = drain_timeout
        self.router: zmq.Socket[bytes] = context.socket(zmq.ROUTER)
        # A client that vanished must not make us block or raise; its replies are dropped.
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 0)
        # With Curve only client keys are admitted (ADMITTED_ROLES), and the mirror holds
        # one device's pages, not a tenant's: no per-request check is needed.
        (security or Security.insecure()).server_socket(self.router)
        self.queue = OpQueue(queue_pages)
        self.pipe = ReplyPipe()
        self.writer = MirrorWriter(store, metrics)
        self._thread = threading.Thread(target=self._write_loop, name="mirror-writer", daemon=True)
        self._poll_all = zmq.Poller()
        self._poll_all.register(self.router, zmq.POLLIN)
        self._poll_all.register(self.pipe.fd, zmq.POLLIN)
        self._poll_replies = zmq.Poller()
        self._poll_replies.register(self.pipe.fd, zmq.POLLIN)
        self._outstanding = 0  # queued ops whose reply the main thread has not sent yet
        self._received = 0  # messages taken from the ROUTER
        self._stopping = False
        self._refusing = False  # shutdown: answer new requests `shutting_down`

    # -- lifecycle -------------------------------------------------------------------------

    def bind(self, endpoint: str) -> str:
        """Bind the ROUTER; returns the endpoint actually bound (with the chosen port)."""
        self.router.bind(endpoint)
        bound = self.router.getsockopt(zmq.LAST_ENDPOINT)
        assert isinstance(bound, bytes)
        return bound.decode()

    def request_stop(self) -> None:
        """Ask the loop to finish (safe from a signal handler)."""
        self._stopping = True

    def serve_forever(self) -> None:
        """Serve until `request_stop`, then finish queued work within the drain timeout.

        Raises:
            ServiceFailure: the writer did not finish within the drain timeout.
        """
        self._thread.start()
        while not self._stopping:
            self._serve_once(POLL_MS)
        if not self._shutdown():
            raise ServiceFailure("the writer did not finish within the drain timeout")

    @property
    def writer_running(self) -> bool:
        """The writer thread is still busy (only after a drain that missed its timeout)."""
        return self._thread.is_alive()

    def _serve_once(self, timeout_ms: int) -> None:
        poller = self._poll_replies if self.queue.full() else self._poll_all
        events = dict(poller.poll(timeout_ms))
        if self.router in events:
            self._drain_router()
        if self.pipe or self.pipe.fd in events:
            self._send_replies()

    def _shutdown(self) -> bool:
        # Stop when the client is quiet, but keep the ROUTER bound until then: unbinding would
        # also cut the pipes of connected clients, and the replies to their requests with
        # them. Requests already on their way (in ZeroMQ's or the kernel's buffers) are
        # served: a page-out the client sent is not refused because of our SIGTERM.
        log.info("stopping: finishing queued requests")
        deadline = time.monotonic() + self.drain_timeout
        quiet_since = time.monotonic()  # nothing outstanding and no new request since
        while (now := time.monotonic()) < deadline:
            if self._outstanding:
                quiet_since = now
            elif now - quiet_since >= QUIET_MS / 1000:
                break
            received = self._received
            self._serve_once(QUIET_MS)
            if self._received != received:
                quiet_since = time.monotonic()
        # Past the deadline: what the writer has not started is refused.
        self._refusing = True
        self._drain_router()
        for op in self.queue.abort():
            if op.request is not None:
                stopping = "mirror stopping"
                op.reply = error_frames(ErrorCode.SHUTTING_DOWN, stopping, op.request.msg_id)
            assert op.reply is not None
            self.pipe.push([[*op.routing, *op.reply]])
        self.queue.close()
        self._thread.join(timeout=max(1.0, self.drain_timeout))
        finished = not self._thread.is_alive()
        self._send_replies()
        # Linger so the last replies leave before the socket goes.
        self.router.close(linger=1000)
        return finished

    def close(self) -> None:
        """Close the ROUTER (if serving never closed it) and the reply pipe, unless the
        writer, which pushes into it, is still running."""
        self.router.close(linger=0)
        if not self.writer_running:
            self.pipe.close()

    # -- main thread: requests in, replies out ---------------------------------------------

    def _drain_router(self) -> int:
        handled = 0
        while handled < MAX_BURST and not self.queue.full():
            try:
                frames = recv_frames(self.router)
            except zmq.Again:
                break
            handled += 1
            self._handle(frames)
        self._received += handled
        return handled

    def _handle(self, frames: Frames) -> None:
        routing = frames[:1]  # a ROUTER always prepends the sender's id
        op_name: str | None = None
        try:
            routing, body = split_routing(frames)
            msg, payload = decode(body, MIRROR_REQUEST_ADAPTER)
            op_name = OP_OF[msg.type]
            if self._refusing:
                self._answer(
                    routing,
                    error_frames(ErrorCode.SHUTTING_DOWN, "mirror stopping", msg.msg_id),
                )
                return
            data, runs = validate(msg, payload, self.store.page_count)
        except ProtocolError as exc:
            if exc.reason in MALFORMED_REASONS:
                self.metrics.malformed_by[exc.reason].inc()
            if op_name is not None:
                self.metrics.error[op_name].inc()
            self._answer(routing, encode(exc.reply()))
            return
        pages = sum(count for _, count in runs)
        self.queue.put(Op(routing=routing, request=msg, data=data, pages=pages, runs=runs))
        self._outstanding += 1

    def _answer(self, routing: Frames, reply: Frames) -> None:
        """Answer at once, unless earlier requests still wait: then keep the reply order."""
        if self._outstanding == 0:
            self._send([*routing, *reply])
            return
        self.queue.put(Op(routing=routing, request=None, reply=reply))
        self._outstanding += 1

    def _send_replies(self) -> None:
        for frames in self.pipe.pop_all():
            self._outstanding -= 1
            self._send(frames)

    def _send(self, frames: Frames) -> None:
        try:
            self.router.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            log.warning("dropped a reply: the client is not reading")

    # -- writer thread ---------------------------------------------------------------------

    def _write_loop(self) -> None:
        while True:
            ops = self.queue.take()
            if not ops:
                return
            try:
                replies = self.writer.execute(ops)
            except Exception:
                # execute answers every op itself; this is a bug, not a device error.
                log.exception("writer failed on a batch of %d ops", len(ops))
                replies = [
                    [*op.routing, *error_frames(ErrorCode.INTERNAL, "internal error", 0)]
                    for op in ops
                ]
            self.queue.done(ops)
            self.pipe.push(replies)


def start(config: MirrorConfig, lifecycle: Lifecycle) -> Started[Servable]:
    """Open the mirror file, bind: the mirror, ready to serve."""
    security = Security.from_settings(config, "mirror")
    with lifecycle.as_config_error(MirrorStoreError, OSError):
        store = MirrorStore(
            config.path,
            config.page_count,
            config.bitmap_path,
            direct_io=config.direct_io,
            forget=config.forget,
        )
    server: MirrorServer | None = None

    def close_store() -> None:
        if server is not None and server.writer_running:
            # The writer missed the drain timeout and may still hold the device: leave the
            # file to the kernel (the exit status says the stop failed).
            log.error("left %s to the kernel: the writer still holds it", config.path)
            return
        store.close()  # fdatasync of data and bitmap

    lifecycle.callback(close_store)
    if store.unreplicated_pages:
        log.warning(
            "reopened with pages held by the mirror only path=%s unreplicated_pages=%d",
            config.path,
            store.unreplicated_pages,
        )
    context = lifecycle.zmq_context()
    metrics = MirrorMetrics(REGISTRY)
    lifecycle.serve_security(security, context, ADMITTED_ROLES, metrics.auth)
    server = MirrorServer(
        store,
        metrics,
        context,
        queue_pages=config.queue_pages,
        drain_timeout=config.drain_timeout,
        security=security,
    )
    lifecycle.callback(server.close)
    with lifecycle.as_failure(f"cannot bind {config.listen}", zmq.ZMQError):
        endpoint = server.bind(bind_address(config.listen))
    metrics.watch(
        MirrorGauges(
            pending_pages=lambda: server.queue.pending_pages,
            write_lag_seconds=server.queue.lag,
            unreplicated_pages=lambda: store.unreplicated_pages,
            page_count=lambda: store.page_count,
            direct_io=lambda: store.direct_io,
            clean=lambda: store.clean,
        )
    )
    return Started(
        server,
        {
            "endpoint": endpoint,
            "metrics": lifecycle.metrics_endpoint(config.metrics_port, config.metrics_host),
            "path": config.path,
            "page_count": store.page_count,
            "direct_io": store.direct_io,
            "unreplicated_pages": store.unreplicated_pages,
            "clean": store.clean,
            "curve": security.enabled,
        },
    )

"""The mirror's ZeroMQ loop: validate each request, queue it in order, send the writer's replies.

The main thread owns the ROUTER (remem_common.router: ZMTP served from this thread on
plaintext links, libzmq with Curve): it validates each request, queues it for the writer
thread (remem_mirror.writer), and sends the replies the writer hands back through a deque and
an eventfd that the main loop polls beside the ROUTER. The ZMTP router hands over frames that
point into receive buffers it does not reuse (`keep_frames`): the writer copies the pages
from there straight into its O_DIRECT staging buffer.

Back-pressure: while more than `queue_pages` written pages (or that many requests) wait, the
main loop stops reading the ROUTER; the kernel's (or ZeroMQ's) queues and then the client's
sends block. Nothing is ever dropped. (The ZMTP router hands over every message one read of a
connection completed, so the queue may pass its bound by what one read holds.)
"""

from __future__ import annotations

import logging
import select
import threading
import time
from typing import Any, Protocol

import zmq
from remem_common.framing import decode, encode, split_routing
from remem_common.lifecycle import ServiceFailure
from remem_common.protocol.client_mirror import (
    MIRROR_REQUEST_ADAPTER,
    PAYLOAD_FRAMES,
    MarkReplicatedRequest,
    MirrorRequest,
    ReadPagesRequest,
    TrimPagesRequest,
    WriteExtentsRequest,
    WritePagesRequest,
    unpack_extents,
)
from remem_common.protocol.envelope import (
    MALFORMED_REASONS,
    ErrorCode,
    ProtocolError,
)
from remem_common.protocol.pages import PAGE_SIZE
from remem_common.router import Router, open_router
from remem_common.security import Security
from remem_common.zmtp import ZmtpError

from remem_mirror.metrics import MirrorMetrics
from remem_mirror.store import MirrorStore
from remem_mirror.writer import OP_OF, Frames, MirrorWriter, Op, OpQueue, ReplyPipe, error_frames

log = logging.getLogger("mirror")


# Messages taken from the ROUTER per wake-up before queued replies get sent.
MAX_BURST = 256
# How long the last replies may take to leave at shutdown.
LINGER_MS = 1000
POLL_MS = 100
# Shutdown waits for the queue to empty and then this long without a new request.
QUIET_MS = 20


class Poller(Protocol):
    """What the main loop waits on: zmq.Poller, or select.poll where every input is an fd."""

    def poll(self, timeout: int) -> list[tuple[Any, int]]: ...


def fd_poller(*fds: int) -> Poller:
    """A select.poll over `fds`: the ZMTP router's epoll fd and the reply pipe's eventfd are
    plain fds, and waking from zmq.Poller (zmq_poll and the Python around it) cost more per
    wake-up; a 1 MiB page-out wakes the loop once per socket buffer's worth of data."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    return poller


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
    """Serves one mirror store on one ROUTER until asked to stop."""

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
        self._context = context
        # With Curve only client keys are admitted (service.ADMITTED_ROLES), and the mirror holds
        # one device's pages, not a tenant's: no per-request check is needed.
        self._security = security or Security.insecure()
        self.router: Router | None = None  # opened by `bind`, which knows the endpoint
        self.queue = OpQueue(queue_pages)
        self.pipe = ReplyPipe()
        self.writer = MirrorWriter(store, metrics)
        self._thread = threading.Thread(target=self._write_loop, name="mirror-writer", daemon=True)
        # Set by `bind`, which knows whether the ROUTER is an fd.
        self._poll_all: Poller = fd_poller(self.pipe.fd)
        self._poll_replies: Poller = fd_poller(self.pipe.fd)
        self._outstanding = 0  # queued ops whose reply the main thread has not sent yet
        self._received = 0  # messages taken from the ROUTER
        self._stopping = False
        self._refusing = False  # shutdown: answer new requests `shutting_down`

    # -- lifecycle -------------------------------------------------------------------------

    def bind(self, endpoint: str) -> str:
        """Open and bind the ROUTER; returns the endpoint actually bound (with the chosen
        port)."""
        assert self.router is None
        self.router = open_router(
            endpoint,
            self._context,
            self._security,
            on_violation=self._zmtp_violation,
            keep_frames=True,  # ops hold their data frames until the writer is done
        )
        pollable = self.router.pollable
        if isinstance(pollable, int):
            self._poll_all = fd_poller(pollable, self.pipe.fd)
        else:  # a libzmq socket
            poll_all = zmq.Poller()
            poll_all.register(pollable, zmq.POLLIN)
            poll_all.register(self.pipe.fd, zmq.POLLIN)
            self._poll_all = poll_all
        return self.router.bind(endpoint)

    def _zmtp_violation(self, exc: ZmtpError) -> None:
        """A peer broke ZMTP (the ZMTP router closed its connection): counted as libzmq's
        ROUTER would not, beside the messages refused as malformed."""
        self.metrics.malformed_by["bad_frames"].inc()

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
        assert self.router is not None
        poller = self._poll_replies if self.queue.full() else self._poll_all
        events = dict(poller.poll(timeout_ms))
        if self.router.pollable in events:
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
        assert self.router is not None
        self.router.close(linger_ms=LINGER_MS)
        return finished

    def close(self) -> None:
        """Close the ROUTER (if serving never closed it) and the reply pipe, unless the
        writer, which pushes into it, is still running."""
        if self.router is not None:
            self.router.close()
        if not self.writer_running:
            self.pipe.close()

    # -- main thread: requests in, replies out ---------------------------------------------

    def _drain_router(self) -> int:
        assert self.router is not None
        handled = 0
        # One receive at a time, so reading stops as soon as the queue is full.
        while handled < MAX_BURST and not self.queue.full():
            took = self.router.drain(self._handle, 1)
            if not took:
                break
            handled += took
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
        replies = self.pipe.pop_all()
        if not replies:
            return
        self._outstanding -= len(replies)
        assert self.router is not None
        dropped = self.router.send_all(replies)
        if dropped:
            log.warning("dropped %d replies: the client is not reading", dropped)

    def _send(self, frames: Frames) -> None:
        assert self.router is not None
        if not self.router.send(frames):
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

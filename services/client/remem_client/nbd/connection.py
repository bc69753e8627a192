"""The socket side of an NBD connection: lifecycle, the handshake phase, pausing and closing.

`BaseConnection` is the asyncio protocol object up to the point where requests start: it
counts the connection, runs the handshake (`handshake.negotiate`, one coroutine reading
from the receive buffer through `read_exact`) under a timeout, pauses reading for any of
several reasons at once, and closes: gracefully once idle (NBD_CMD_DISC, EOF, a protocol
violation, server shutdown), or at once (`abort`, when the shutdown drain timed out).
`transmission.NbdConnection` adds the transmission phase (parse, validate, dispatch).

What is in flight is tracked here (`_running`: the Task or `drive.Driven` of each
suspended request), so that `abort` can cancel it and `closed` resolves only once the
socket is gone and nothing of the connection runs any more.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import TYPE_CHECKING, Any, cast

from remem_client.nbd.buffers import PayloadPool, RxPool
from remem_client.nbd.handshake import HandshakeError, TruncatedRead, negotiate
from remem_client.nbd.replies import ReplyWriter

if TYPE_CHECKING:
    from remem_client.backend import Backend
    from remem_client.metrics import NbdStats
    from remem_client.nbd.buffers import PartialWrite
    from remem_client.nbd.drive import Driven
    from remem_client.nbd.handshake import Export, Negotiated

log = logging.getLogger(__name__)

MIN_RECV = 16 * 1024  # compact the receive buffer when less than this is free at its end
WRITE_BUFFER_HIGH = 16 * 1024 * 1024  # transport write buffer: stop reading above this...
WRITE_BUFFER_LOW = 4 * 1024 * 1024  # ...and resume below this
HANDSHAKE_TIMEOUT = 60.0  # seconds a client may take to reach transmission

# Why reading is paused (a bit mask: reading resumes once no reason is left)
PAUSE_INFLIGHT = 1  # too many requests or payload bytes in flight
PAUSE_WRITING = 2  # the transport's write buffer is above its high-water mark
PAUSE_HANDSHAKE = 4  # the client sent ahead of the handshake
PAUSE_INPUT_CLOSED = 8  # no more requests are read
PAUSE_HANDOVER = 16  # the connection is being handed to the next process (handover.py)


class HandedOver:
    """A connection ready to change process: a dup of its socket and its exact state.

    Attributes:
        fd: a duplicate of the socket's descriptor (the caller owns and closes it).
        negotiated: what the handshake settled.
        pending: bytes of the next request already read from the socket (incomplete).
    """

    __slots__ = ("fd", "negotiated", "pending")

    def __init__(self, fd: int, negotiated: Negotiated, pending: bytes) -> None:
        self.fd = fd
        self.negotiated = negotiated
        self.pending = pending


class ExportContext:
    """What every connection to the export shares: backend, stats, pools, shutdown state."""

    def __init__(self, backend: Backend, export: Export, stats: NbdStats) -> None:
        self.backend = backend
        self.export = export
        self.stats = stats
        self.eager = bool(getattr(backend, "eager", False))
        self.task_free = self.eager and bool(getattr(backend, "task_free", False))
        self.can_fast_zero = bool(getattr(backend, "can_fast_zero", False))
        self.pool = PayloadPool()
        self.rx_pool = RxPool()
        self.shutting_down = False
        self.connections: set[BaseConnection] = set()
        # uvloop's writelines hands every buffer to one writev; asyncio's (3.11) joins them.
        self.scatter_gather = False


class BaseConnection(asyncio.BufferedProtocol):
    """An NBD connection from accept to close; the subclass serves the transmission phase."""

    def __init__(self, ctx: ExportContext, resume: tuple[Negotiated, bytes] | None = None) -> None:
        self._ctx = ctx
        self._stats = ctx.stats
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._replies = ReplyWriter(self._loop, ctx.scatter_gather)
        # Resolves once the socket is gone and no request of this connection runs any more.
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self._rx = ctx.rx_pool.take()
        self._start = 0  # first unconsumed byte in the receive buffer
        self._end = 0  # end of received bytes
        self._need = 0  # bytes from _start needed for the next message
        self._payload: PartialWrite | None = None  # a big WRITE payload still arriving
        # handshake phase
        self._in_handshake = True
        self._handshake_task: asyncio.Task[None] | None = None
        self._want = 0
        self._want_future: asyncio.Future[bytes] | None = None
        self._eof = False
        # suspended requests, by what runs them (a Task holds only a weak ref to itself)
        self._running: set[asyncio.Task[Any] | Driven] = set()
        self._paused = 0  # PAUSE_* reasons
        self._input_closed = False  # no more requests are parsed (DISC, EOF, violation)
        self._close_when_idle = False  # close once no request is in flight
        self._closing = False  # transport.close() called: nothing more is sent
        self._lost = False  # connection_lost was called
        # Handover (handover.py): a socket adopted from the previous process starts in
        # transmission with what it negotiated there and the bytes it had read ahead.
        self._adopted = resume
        self.negotiated: Negotiated | None = None
        self._handing_over = False
        self._handover_ready: asyncio.Future[None] | None = None

    def _enter_transmission(self, negotiated: Negotiated) -> None:
        """The handshake is done: serve requests (what is already received, then more)."""
        raise NotImplementedError

    # --- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; both have the methods used.
        self._transport = cast("asyncio.Transport", transport)
        self._replies.transport = self._transport
        sock = self._transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH, low=WRITE_BUFFER_LOW)
        self._ctx.connections.add(self)
        self._stats.connections += 1
        if self._ctx.shutting_down:
            self._close()
            return
        if self._adopted is not None:
            negotiated, pending = self._adopted
            self._adopted = None
            self._rx.data[: len(pending)] = pending
            self._end = len(pending)
            self.negotiated = negotiated
            self._enter_transmission(negotiated)
            return
        self._handshake_task = self._loop.create_task(self._handshake())

    def connection_lost(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._set_closing()
        self._input_closed = True
        self._stats.connections -= 1
        future = self._want_future
        if future is not None and not future.done():
            # the handshake coroutine sees the hang-up where it waits, and ends
            future.set_exception(TruncatedRead(self._end - self._start))
        elif self._handshake_task is not None and not self._handshake_task.done():
            self._handshake_task.cancel()
        if self._rx.pins == 0:
            self._ctx.rx_pool.give(self._rx)
        if not self._running:
            self._finished()

    def _finished(self) -> None:
        """The socket is gone and no request runs: the connection is over."""
        self._ctx.connections.discard(self)
        if not self.closed.done():
            self.closed.set_result(None)

    def eof_received(self) -> bool:
        self._eof = True
        if self._in_handshake:
            future = self._want_future
            if future is not None and not future.done():
                self._want_future = None
                future.set_exception(TruncatedRead(self._end - self._start))
            return True  # the handshake coroutine closes the connection
        if not self._input_closed and (self._payload is not None or self._end > self._start):
            self._stats.count_malformed("truncated")
            log.info("nbd: client closed its side inside a request")
        self._stop_input()
        self._close_once_idle()
        return True  # keep the transport open for replies to requests still in flight

    def pause_writing(self) -> None:
        self._pause(PAUSE_WRITING)

    def resume_writing(self) -> None:
        self._resume(PAUSE_WRITING)

    # --- handshake ----------------------------------------------------------------------

    async def read_exact(self, n: int) -> bytes:
        """HandshakeIO: the next n received bytes (raises TruncatedRead on EOF)."""
        start = self._start
        if self._end - start >= n:
            self._start = start + n
            if self._paused & PAUSE_HANDSHAKE:
                self._resume(PAUSE_HANDSHAKE)
            return bytes(self._rx.view[start : start + n])
        if self._eof or self._closing:
            raise TruncatedRead(self._end - start)
        self._want = n
        self._need = n
        future: asyncio.Future[bytes] = self._loop.create_future()
        self._want_future = future
        return await future

    def write(self, data: bytes) -> None:
        """HandshakeIO: send handshake bytes."""
        if not self._closing and self._transport is not None:
            self._transport.write(data)

    def _feed_handshake(self) -> None:
        """Bytes arrived during the handshake: hand `read_exact` what it waits for."""
        future = self._want_future
        if future is not None and self._end - self._start >= self._want:
            self._want_future = None
            start = self._start
            self._start = start + self._want
            if not future.done():
                future.set_result(bytes(self._rx.view[start : self._start]))
        if len(self._rx.data) - (self._end - self._start) < MIN_RECV:
            # The client sends without waiting for replies; hold it until we catch up.
            self._pause(PAUSE_HANDSHAKE)

    async def _handshake(self) -> None:
        ctx = self._ctx
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                negotiated = await negotiate(self, ctx.export)
        except HandshakeError as exc:
            self._violation(exc.reason, str(exc))
            return
        except TimeoutError:
            self._violation("handshake_timeout", "handshake took too long")
            return
        except TruncatedRead:
            self._close()
            return
        except Exception:
            log.exception("nbd: handshake failed")
            self._close()
            return
        if negotiated is None or ctx.shutting_down:
            self._close()
            return
        self.negotiated = negotiated
        self._enter_transmission(negotiated)

    # --- pausing and closing ------------------------------------------------------------

    def _pause(self, reason: int) -> None:
        if not self._paused and self._transport is not None and not self._closing:
            self._transport.pause_reading()
        self._paused |= reason

    def _resume(self, reason: int) -> None:
        if not self._paused & reason:
            return
        self._paused &= ~reason
        if not self._paused and self._transport is not None and not self._closing:
            self._transport.resume_reading()

    def _stop_input(self) -> None:
        self._input_closed = True
        self._pause(PAUSE_INPUT_CLOSED)

    def _close_once_idle(self) -> None:
        if self._running:
            self._close_when_idle = True
        else:
            self._close()

    def _set_closing(self) -> None:
        self._closing = True
        self._replies.closed = True

    def _close(self) -> None:
        """Send what is queued, then close (in-flight replies, if any, are dropped)."""
        if self._closing:
            return
        self._replies.flush()
        self._set_closing()
        self._input_closed = True
        if self._transport is not None:
            self._transport.close()

    def _violation(self, reason: str, detail: str) -> None:
        self._stats.count_malformed(reason)
        log.info("nbd: closing connection: %s", detail)
        self._stop_input()
        self._close_once_idle()

    def begin_shutdown(self) -> None:
        """Server shutdown: finish requests in flight (new ones get ESHUTDOWN), then close."""
        if self._in_handshake:
            self._close()
        else:
            self._close_once_idle()

    # --- handover to the next process (handover.py) ---------------------------------------

    def begin_handover(self) -> bool:
        """Stop reading at a request boundary, to hand the socket over once idle.

        A big WRITE whose payload is still arriving is read to its end first (its buffer
        asks for exactly the rest), so the stream stops between two requests or inside a
        partial request held in the receive buffer. A connection not in transmission, or
        already closing, gets `begin_shutdown` instead.

        Returns:
            True if the connection is being handed over (then await `hand_over`).
        """
        if self._in_handshake or self._input_closed or self._closing or self.negotiated is None:
            self.begin_shutdown()
            return False
        self._handing_over = True
        self._handover_ready = self._loop.create_future()
        self._handover_step()
        return True

    def _handover_step(self) -> None:
        """Pause once no payload is arriving; signal once nothing is in flight either."""
        if self._payload is not None:
            return
        self._pause(PAUSE_HANDOVER)
        ready = self._handover_ready
        if not self._running and ready is not None and not ready.done():
            ready.set_result(None)

    async def hand_over(self) -> HandedOver | None:
        """Once every request read is answered and sent: a dup of the socket, and the state.

        Returns:
            None if the connection closed meanwhile (the peer hung up or sent DISC).
        """
        ready = self._handover_ready
        assert ready is not None and self.negotiated is not None
        await asyncio.wait([ready, self.closed], return_when=asyncio.FIRST_COMPLETED)
        self._replies.flush()
        transport = self._transport
        # Every reply byte must be in the socket before it changes hands: the next
        # process knows nothing of this one's write buffer.
        while (
            transport is not None
            and not self._closing
            and not self._input_closed
            and transport.get_write_buffer_size()
        ):
            await asyncio.sleep(0.001)
        if transport is None or self._closing or self._input_closed or not ready.done():
            return None
        sock = transport.get_extra_info("socket")
        if sock is None:
            return None
        pending = bytes(self._rx.view[self._start : self._end])
        return HandedOver(os.dup(sock.fileno()), self.negotiated, pending)

    def abort(self) -> None:
        """Drop the connection now (shutdown drain timed out), cancelling what is in flight.

        A request driven without a Task is cancelled at once, and its ESHUTDOWN reply goes
        out if the socket takes it; a Task finishes cancelling on a later loop turn (its
        reply is dropped). `closed` resolves when both the socket and the requests are gone.
        """
        for runner in list(self._running):
            runner.cancel()
        self._replies.flush()
        self._set_closing()
        if self._transport is not None and not self._lost:
            self._transport.abort()

"""NBD connection: receive buffer, request parsing and validation, replies (the hot path).

One `NbdConnection` (an asyncio.BufferedProtocol) per client socket. It runs the handshake
(`handshake.negotiate`, as one coroutine reading from the same buffer), then serves
requests until NBD_CMD_DISC, EOF, a protocol violation or server shutdown.

How a request travels, and why:

* Receiving: the transport reads straight into a preallocated 256 KiB receive buffer
  (`get_buffer`/`buffer_updated`, no per-read allocation); every complete request in it
  is parsed in place with one `struct.unpack_from`. A WRITE payload that is already in
  the buffer goes to the backend as a memoryview of it (no copy). A payload of 64 KiB or
  more that has not fully arrived gets its own pooled buffer and the transport receives
  the rest directly into it, so a 1 MiB write is copied once, by the kernel.
* Validation: command known and advertised, flags legal for it, offset + length within
  the export, READ/WRITE length <= 32 MiB (see `_reject` for the errno of each case),
  before the backend sees anything. There is no alignment check (the house style's 4 KiB
  rule does not fit here): the advertised minimum block size is 1, so byte-addressing
  clients (qemu-io, nbdcopy) work, and a page-based backend does its own
  read-modify-write. A WRITE's payload is always consumed first, so a
  refused write leaves the stream in sync; a WRITE longer than the 32 MiB maximum, or a
  bad request magic, closes the connection (the spec allows a hard disconnect there):
  nothing after it is read, but the requests before it are still answered, as after
  NBD_CMD_DISC, so a client learns the fate of every write it sent before the fault.
* Backend calls: coroutines of an `eager` backend are started right in the socket
  callback and wrapped in a Task only if they suspend (`_Continue`), or, if it is also
  `task_free`, driven from the futures they wait on without any Task (`_Driven`); others
  get a Task each. Either way requests overlap and replies go out in completion order: a slow read
  never holds back a later fast one.
* Buffer lifetime: a suspended WRITE pins the receive buffer its payload lives in; the
  connection then continues in a fresh buffer and the pinned one is recycled once its
  last write finishes. Pooled payload buffers go back to the pool on completion.
* Replies: headers are packed with one struct call; replies produced in one callback are
  collected and written with as few transport writes as possible (small parts joined,
  big READ payloads passed as they are, `writelines` where the loop does scatter/gather).
* Bounds: at most MAX_INFLIGHT suspended requests and MAX_HELD_BYTES of payload buffers
  per connection, and a transport write buffer of WRITE_BUFFER_HIGH; beyond any of them
  the connection stops reading until it drains.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Coroutine, Generator
from functools import partial
from time import perf_counter
from typing import TYPE_CHECKING, Any, cast

from remem_client.backend import Backend, BackendError
from remem_client.metrics import RESULT_ERROR, RESULT_INVALID, RESULT_OK, NbdStats
from remem_client.nbd import wire
from remem_client.nbd.handshake import (
    Export,
    HandshakeError,
    Negotiated,
    TruncatedRead,
    negotiate,
)

if TYPE_CHECKING:
    from collections.abc import Callable

log = logging.getLogger(__name__)

RX_SIZE = 256 * 1024  # receive buffer; holds many small requests per recv
DIRECT_PAYLOAD = 64 * 1024  # WRITE payloads from this size are received into their own buffer
MIN_RECV = 16 * 1024  # compact the receive buffer when less than this is free at its end
JOIN_MAX = 64 * 1024  # reply parts below this are joined into one transport write
MAX_INFLIGHT = 1024  # suspended backend calls per connection before reading pauses
MAX_HELD_BYTES = 256 * 1024 * 1024  # buffers held by suspended writes, per connection
WRITE_BUFFER_HIGH = 16 * 1024 * 1024  # transport write buffer: stop reading above this...
WRITE_BUFFER_LOW = 4 * 1024 * 1024  # ...and resume below this
HANDSHAKE_TIMEOUT = 60.0  # seconds a client may take to reach transmission
RX_FREE_LIST = 8  # spare receive buffers kept per server

_PAUSE_INFLIGHT = 1
_PAUSE_WRITING = 2
_PAUSE_HANDSHAKE = 4
_PAUSE_INPUT_CLOSED = 8

_READ = wire.Cmd.READ.value
_WRITE = wire.Cmd.WRITE.value
_DISC = wire.Cmd.DISC.value
_FLUSH = wire.Cmd.FLUSH.value
_TRIM = wire.Cmd.TRIM.value
_WRITE_ZEROES = wire.Cmd.WRITE_ZEROES.value
_NCMDS = max(wire.Cmd) + 1
_REQUEST_SIZE = wire.REQUEST_SIZE
_REQUEST_MAGIC = wire.REQUEST_MAGIC
_MAX_BLOCK = wire.MAX_BLOCK_SIZE
_FUA = wire.CMD_FLAG_FUA
_NO_HOLE = wire.CMD_FLAG_NO_HOLE
_FAST_ZERO = wire.CMD_FLAG_FAST_ZERO
_DF = wire.CMD_FLAG_DF
_unpack_request = wire.REQUEST.unpack_from
_pack_simple = wire.SIMPLE_REPLY.pack
_pack_read = wire.STRUCTURED_READ.pack
_pack_chunk = wire.STRUCTURED_REPLY.pack
_SIMPLE_MAGIC = wire.SIMPLE_REPLY_MAGIC
_STRUCTURED_MAGIC = wire.STRUCTURED_REPLY_MAGIC
_DONE = wire.REPLY_FLAG_DONE
_OFFSET_DATA = wire.REPLY_TYPE_OFFSET_DATA
_OFFSET_SIZE = wire.OFFSET.size


class PayloadPool:
    """Reusable bytearrays for large WRITE payloads, in power-of-two size classes.

    Keeps at most `max_idle_bytes` idle; allocating a fresh 1 MiB bytearray costs a
    zero-fill, so reuse saves a pass over the memory per request.
    """

    def __init__(self, max_idle_bytes: int = 64 * 1024 * 1024) -> None:
        self._free: dict[int, list[bytearray]] = {}
        self._idle = 0
        self._max_idle = max_idle_bytes

    def get(self, length: int) -> bytearray:
        size = max(DIRECT_PAYLOAD, 1 << (length - 1).bit_length())
        free = self._free.get(size)
        if free:
            self._idle -= size
            return free.pop()
        return bytearray(size)

    def put(self, buf: bytearray) -> None:
        size = len(buf)
        if self._idle + size <= self._max_idle:
            self._free.setdefault(size, []).append(buf)
            self._idle += size


class _RxBuffer:
    """A receive buffer and the number of suspended writes whose payload lives in it."""

    __slots__ = ("data", "pins", "view")

    def __init__(self) -> None:
        self.data = bytearray(RX_SIZE)
        self.view = memoryview(self.data)
        self.pins = 0


class _Payload:
    """A large WRITE whose payload is being received into its own buffer."""

    __slots__ = ("buf", "flags", "got", "handle", "length", "offset", "view")

    def __init__(
        self, flags: int, handle: int, offset: int, length: int, buf: bytearray, got: int
    ) -> None:
        self.flags = flags
        self.handle = handle
        self.offset = offset
        self.length = length
        self.buf = buf
        self.view = memoryview(buf)[:length]
        self.got = got


class _Continue:
    """Awaitable that drives a coroutine which already yielded `first` outside any Task.

    Used as `await _Continue(coro, first)` inside a new Task: it passes `first` (the Future
    the coroutine waits on, or None for a bare yield) to the Task as if the coroutine had
    yielded it there, then forwards every later send/throw, exactly like `yield from`.
    The Task's own machinery (cancellation, current_task, futures) works unchanged.
    """

    __slots__ = ("_coro", "_first")

    def __init__(self, coro: Coroutine[Any, Any, Any], first: Any) -> None:
        self._coro = coro
        self._first = first

    def __await__(self) -> Generator[Any, Any, Any]:
        coro = self._coro
        value = self._first
        self._first = None
        while True:
            try:
                sent = yield value
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # thrown in by the Task (cancellation): pass it on
                try:
                    value = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    value = coro.send(sent)
                except StopIteration as stop:
                    return stop.value


async def _continue(coro: Coroutine[Any, Any, Any], first: Any) -> Any:
    return await _Continue(coro, first)


# What answering a request needs: cmd, flags, handle, offset, length, t0 and the payload
# buffer it holds (see NbdConnection._done).
_Request = tuple[int, int, int, int, int, float, "_RxBuffer | bytearray | None"]


class _Driven:
    """A suspended request of a `task_free` backend, driven without a Task: each future it
    waits on resumes it straight from its done callback.

    A Task per request costs, in CPython 3.11, a WeakSet registration, a context copy and
    a loop callback to start and one to report: about a tenth of a 4 KiB read's CPU in the
    remote backend. Semantics are a Task's for what such a backend does: an awaited future
    that fails raises in the coroutine (Future.__await__ does that), a bare `yield` (sleep(0))
    resumes on the next loop turn; `asyncio.current_task()` is None throughout.
    """

    __slots__ = ("_args", "_conn", "_coro", "_step_cb")

    def __init__(
        self, conn: NbdConnection, coro: Coroutine[Any, Any, Any], request: _Request
    ) -> None:
        self._conn = conn
        self._coro = coro
        self._args = request
        self._step_cb = self._step

    def wait(self, yielded: Any) -> None:
        if yielded is None:  # a bare yield: run again on the next turn of the loop
            self._conn._loop.call_soon(self._step_cb, None)
        elif getattr(yielded, "_asyncio_future_blocking", None) is not None:
            yielded._asyncio_future_blocking = False
            yielded.add_done_callback(self._step_cb)
        else:
            self._finish(None, RuntimeError(f"backend coroutine yielded {yielded!r}"))

    def _step(self, _future: Any) -> None:
        try:
            yielded = self._coro.send(None)
        except StopIteration as stop:
            self._finish(stop.value, None)
        except asyncio.CancelledError:  # a future it awaited was cancelled: as a Task would
            self._conn._done(self._args, None, None, cancelled=True)
        except Exception as exc:
            self._finish(None, exc)
        else:
            self.wait(yielded)

    def _finish(self, result: Any, exc: BaseException | None) -> None:
        if exc is not None:
            self._coro.close()
        self._conn._done(self._args, result, exc)


async def _then_flush(first: Coroutine[Any, Any, None], backend: Backend) -> None:
    """Run a trim/zero, then flush: FUA on commands whose backend call has no fua flag."""
    await first
    await backend.flush()


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
        self.rx_free: list[_RxBuffer] = []
        self.shutting_down = False
        self.connections: set[NbdConnection] = set()
        # uvloop's writelines hands every buffer to one writev; asyncio's (3.11) joins them.
        self.scatter_gather = False

    def take_rx(self) -> _RxBuffer:
        return self.rx_free.pop() if self.rx_free else _RxBuffer()

    def give_rx(self, rx: _RxBuffer) -> None:
        if len(self.rx_free) < RX_FREE_LIST:
            self.rx_free.append(rx)


_ERROR_TEXT: dict[int, bytes] = {
    wire.NBD_EINVAL: b"invalid request",
    wire.NBD_ENOSPC: b"request beyond the end of the device",
    wire.NBD_ENOTSUP: b"fast zero not supported by this backend",
    wire.NBD_ESHUTDOWN: b"server is shutting down",
    wire.NBD_EIO: b"backend I/O error",
}


class NbdConnection(asyncio.BufferedProtocol):
    """One NBD client connection, from greeting to close."""

    def __init__(self, ctx: ExportContext) -> None:
        self._ctx = ctx
        self._stats = ctx.stats
        self._backend = ctx.backend
        self._pool = ctx.pool
        self._eager = ctx.eager
        self._task_free = ctx.task_free
        self._size = ctx.export.size
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self._rx = ctx.take_rx()
        self._start = 0  # first unconsumed byte in the receive buffer
        self._end = 0  # end of received bytes
        self._need = _REQUEST_SIZE  # bytes from _start needed for the next message
        self._payload: _Payload | None = None
        self._expect_big = False  # last request was a WRITE received into its own buffer
        self._scratch: bytearray | None = None
        # handshake phase
        self._in_handshake = True
        self._handshake_task: asyncio.Task[None] | None = None
        self._want = 0
        self._want_future: asyncio.Future[bytes] | None = None
        self._eof = False
        # transmission phase
        self._structured = False
        self._allowed: list[int] = [-1] * _NCMDS
        self._max_length: list[int] = [0] * _NCMDS
        self._inflight = 0
        self._held = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._paused = 0
        self._input_closed = False  # no more requests are parsed (DISC, EOF, violation)
        self._close_when_idle = False  # close once no request is in flight
        self._closing = False  # transport.close() called: nothing more is sent
        # replies produced in the current callback, written by _flush
        self._out: list[bytes | bytearray | memoryview] = []
        self._out_big = False
        self._batching = False
        self._flush_scheduled = False

    # --- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; both have the methods used.
        self._transport = cast("asyncio.Transport", transport)
        sock = self._transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH, low=WRITE_BUFFER_LOW)
        self._ctx.connections.add(self)
        self._stats.connections += 1
        if self._ctx.shutting_down:
            self._close()
            return
        self._handshake_task = self._loop.create_task(self._handshake())

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed.done():
            return
        self._closing = True
        self._input_closed = True
        self._ctx.connections.discard(self)
        self._stats.connections -= 1
        future = self._want_future
        if future is not None and not future.done():
            # the handshake coroutine sees the hang-up where it waits, and ends
            future.set_exception(TruncatedRead(self._end - self._start))
        elif self._handshake_task is not None and not self._handshake_task.done():
            self._handshake_task.cancel()
        if self._rx.pins == 0:
            self._ctx.give_rx(self._rx)
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
        self._pause(_PAUSE_WRITING)

    def resume_writing(self) -> None:
        self._resume(_PAUSE_WRITING)

    def get_buffer(self, sizehint: int) -> memoryview:
        payload = self._payload
        if payload is not None:
            return payload.view[payload.got :]
        rx = self._rx
        size = len(rx.data)
        if size - self._end < MIN_RECV or size - self._start < self._need:
            self._compact()
            rx = self._rx
        if self._expect_big and self._end == self._start:
            # The last request was a big WRITE: read only the next header, so that if it is
            # another big WRITE its payload lands in its own buffer instead of being copied.
            return rx.view[self._end : self._end + _REQUEST_SIZE]
        if self._end == size:  # only reachable after input is closed: swallow the bytes
            if self._scratch is None:
                self._scratch = bytearray(MIN_RECV)
            return memoryview(self._scratch)
        return rx.view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        payload = self._payload
        if payload is not None:
            payload.got += nbytes
            if payload.got < payload.length:
                return
            self._payload = None
            self._batching = True
            self._request(
                payload.flags,
                _WRITE,
                payload.handle,
                payload.offset,
                payload.length,
                payload.view,
                payload.buf,
            )
            self._parse()
            self._batching = False
            self._flush()
            return
        if self._end == len(self._rx.data):  # bytes went to the scratch buffer
            return
        self._end += nbytes
        if self._in_handshake:
            self._feed_handshake()
            return
        self._batching = True
        self._parse()
        self._batching = False
        if self._out:
            self._flush()

    # --- handshake ----------------------------------------------------------------------

    async def read_exact(self, n: int) -> bytes:
        """HandshakeIO: the next n received bytes (raises TruncatedRead on EOF)."""
        start = self._start
        if self._end - start >= n:
            self._start = start + n
            if self._paused & _PAUSE_HANDSHAKE:
                self._resume(_PAUSE_HANDSHAKE)
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
        future = self._want_future
        if future is not None and self._end - self._start >= self._want:
            self._want_future = None
            start = self._start
            self._start = start + self._want
            if not future.done():
                future.set_result(bytes(self._rx.view[start : self._start]))
        if len(self._rx.data) - (self._end - self._start) < MIN_RECV:
            # The client sends without waiting for replies; hold it until we catch up.
            self._pause(_PAUSE_HANDSHAKE)

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
        self._enter_transmission(negotiated)

    def _enter_transmission(self, negotiated: Negotiated) -> None:
        self._in_handshake = False
        self._need = _REQUEST_SIZE
        self._structured = negotiated.structured_replies
        flags = negotiated.transmission_flags
        fua = _FUA if flags & wire.FLAG_SEND_FUA else 0
        allowed = [-1] * _NCMDS
        allowed[_READ] = fua | (_DF if flags & wire.FLAG_SEND_DF else 0)
        allowed[_WRITE] = fua
        if flags & wire.FLAG_SEND_FLUSH:
            allowed[_FLUSH] = fua
        if flags & wire.FLAG_SEND_TRIM:
            allowed[_TRIM] = fua
        if flags & wire.FLAG_SEND_WRITE_ZEROES:
            fast = _FAST_ZERO if flags & wire.FLAG_SEND_FAST_ZERO else 0
            allowed[_WRITE_ZEROES] = fua | _NO_HOLE | fast
        self._allowed = allowed
        # READ/WRITE are bounded by the advertised maximum block size; TRIM and WRITE_ZEROES
        # carry no payload and may cover any u32 length (the spec lets a server accept them).
        max_length = [0xFFFFFFFF] * _NCMDS
        max_length[_READ] = max_length[_WRITE] = _MAX_BLOCK
        max_length[_FLUSH] = 0
        self._max_length = max_length
        if self._end > self._start:
            self._batching = True
            self._parse()
            self._batching = False
            self._flush()
        if self._eof:
            self.eof_received()
        elif self._paused & _PAUSE_HANDSHAKE:
            self._resume(_PAUSE_HANDSHAKE)

    # --- receiving ----------------------------------------------------------------------

    def _compact(self) -> None:
        """Move the unconsumed tail to the front, or into a fresh buffer if this one is pinned."""
        rx = self._rx
        start, end = self._start, self._end
        tail = bytes(rx.view[start:end]) if end > start else b""
        if rx.pins:
            rx = self._rx = self._ctx.take_rx()
        rx.data[: len(tail)] = tail
        self._start = 0
        self._end = len(tail)

    def _parse(self) -> None:
        """Handle every complete request in the receive buffer."""
        rx = self._rx
        data = rx.data
        start = self._start
        end = self._end
        while not self._input_closed:
            available = end - start
            if available < _REQUEST_SIZE:
                self._need = _REQUEST_SIZE
                break
            magic, flags, cmd, handle, offset, length = _unpack_request(data, start)
            if magic != _REQUEST_MAGIC:
                self._start = start
                self._violation("bad_request_magic", f"bad request magic {magic:#x}")
                return
            if cmd != _WRITE or length < DIRECT_PAYLOAD:
                self._expect_big = False
            if cmd == _WRITE:
                if length > _MAX_BLOCK:
                    self._start = start
                    self._violation("write_too_large", f"WRITE of {length} bytes")
                    return
                body = start + _REQUEST_SIZE
                if available - _REQUEST_SIZE >= length:
                    start = self._start = body + length
                    self._request(flags, cmd, handle, offset, length, rx.view[body:start], rx)
                    continue
                if length >= DIRECT_PAYLOAD:
                    # Receive the rest of a big payload straight into its own buffer.
                    self._expect_big = True
                    buf = self._pool.get(length)
                    have = end - body
                    buf[:have] = rx.view[body:end]
                    self._payload = _Payload(flags, handle, offset, length, buf, have)
                    start = end
                    self._need = _REQUEST_SIZE
                    break
                self._need = _REQUEST_SIZE + length
                break
            start = self._start = start + _REQUEST_SIZE
            if cmd == _DISC:
                self._stats.observe(_DISC, RESULT_OK, 0.0)
                self._stop_input()
                self._close_once_idle()
                break
            self._request(flags, cmd, handle, offset, length, None, None)
        self._start = start
        if start == end and rx.pins == 0:
            self._start = self._end = 0

    # --- requests -----------------------------------------------------------------------

    def _request(
        self,
        flags: int,
        cmd: int,
        handle: int,
        offset: int,
        length: int,
        payload: memoryview | None,
        owner: _RxBuffer | bytearray | None,
    ) -> None:
        """Validate one complete request and start its backend call."""
        t0 = perf_counter()
        allowed = self._allowed[cmd] if cmd < _NCMDS else -1
        if (
            allowed < 0
            or flags & ~allowed
            or offset + length > self._size
            or length > self._max_length[cmd]
            or (cmd == _FLUSH and offset)
        ):
            self._reject(flags, cmd, handle, offset, length, t0)
            self._release(owner, False)
            return
        ctx = self._ctx
        if ctx.shutting_down:
            self._fail(cmd, handle, wire.NBD_ESHUTDOWN, t0)
            self._release(owner, False)
            return
        backend = self._backend
        coro: Coroutine[Any, Any, Any]
        if cmd == _READ:
            if not length:
                self._send_empty_read(handle)
                self._stats.observe(cmd, RESULT_OK, perf_counter() - t0)
                return
            coro = backend.pread(offset, length)
        elif cmd == _WRITE:
            assert payload is not None
            if not length:
                self._ok(cmd, handle, t0)
                return
            coro = backend.pwrite(offset, payload, bool(flags & _FUA))
        elif cmd == _FLUSH:
            coro = backend.flush()
        elif cmd == _TRIM:
            if not length:
                self._ok(cmd, handle, t0)
                return
            coro = backend.trim(offset, length)
            if flags & _FUA:
                coro = _then_flush(coro, backend)
        else:  # WRITE_ZEROES: the only other command _allowed lets through
            if flags & _FAST_ZERO and not ctx.can_fast_zero:
                self._fail(cmd, handle, wire.NBD_ENOTSUP, t0)
                return
            if not length:
                self._ok(cmd, handle, t0)
                return
            coro = backend.zero(offset, length, not flags & _NO_HOLE)
            if flags & _FUA:
                coro = _then_flush(coro, backend)
        self._run(coro, cmd, flags, handle, offset, length, t0, owner)

    def _run(
        self,
        coro: Coroutine[Any, Any, Any],
        cmd: int,
        flags: int,
        handle: int,
        offset: int,
        length: int,
        t0: float,
        owner: _RxBuffer | bytearray | None,
    ) -> None:
        """Drive a backend coroutine: inline to completion if it never suspends, else a Task."""
        if self._eager:
            try:
                yielded = coro.send(None)
            except StopIteration as stop:
                self._succeed(cmd, handle, offset, length, t0, stop.value)
                self._release(owner, False)
                return
            except Exception as exc:
                self._failed(cmd, flags, handle, t0, exc)
                self._release(owner, False)
                return
            if self._task_free:
                self._track(owner)
                request = (cmd, flags, handle, offset, length, t0, owner)
                _Driven(self, coro, request).wait(yielded)
                return
            task = self._loop.create_task(_continue(coro, yielded))
        else:
            task = self._loop.create_task(coro)
        self._tasks.add(task)
        self._track(owner)
        task.add_done_callback(
            partial(self._task_done, (cmd, flags, handle, offset, length, t0, owner))
        )

    def _track(self, owner: _RxBuffer | bytearray | None) -> None:
        """Count a suspended request and the payload buffer it holds; pause past the bounds."""
        self._inflight += 1
        self._stats.inflight += 1
        if owner is not None:
            if isinstance(owner, _RxBuffer):
                if not owner.pins:
                    self._held += RX_SIZE
                owner.pins += 1
            else:
                self._held += len(owner)
        if self._inflight >= MAX_INFLIGHT or self._held >= MAX_HELD_BYTES:
            self._pause(_PAUSE_INFLIGHT)

    def _task_done(self, request: _Request, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            self._done(request, None, None, cancelled=True)
        else:
            exc = task.exception()
            self._done(request, task.result() if exc is None else None, exc)

    def _done(
        self,
        request: _Request,
        result: Any,
        exc: BaseException | None,
        *,
        cancelled: bool = False,
    ) -> None:
        """A suspended request finished: answer it and release what it held."""
        cmd, flags, handle, offset, length, t0, owner = request
        self._inflight -= 1
        self._stats.inflight -= 1
        self._release(owner, True)
        if cancelled:
            self._fail(cmd, handle, wire.NBD_ESHUTDOWN, t0)
        elif exc is None:
            self._succeed(cmd, handle, offset, length, t0, result)
        else:
            self._failed(cmd, flags, handle, t0, exc)
        if (
            self._paused & _PAUSE_INFLIGHT
            and self._inflight <= MAX_INFLIGHT // 2
            and self._held < MAX_HELD_BYTES // 2
        ):
            self._resume(_PAUSE_INFLIGHT)
        if self._close_when_idle and not self._inflight:
            self._close()

    def _release(self, owner: _RxBuffer | bytearray | None, pinned: bool) -> None:
        if owner is None:
            return
        if type(owner) is _RxBuffer:
            if pinned:
                owner.pins -= 1
                if not owner.pins:
                    self._held -= RX_SIZE
                    if owner is not self._rx and not self._closing:
                        self._ctx.give_rx(owner)
            return
        assert isinstance(owner, bytearray)
        if pinned:
            self._held -= len(owner)
        self._pool.put(owner)

    def _reject(
        self, flags: int, cmd: int, handle: int, offset: int, length: int, t0: float
    ) -> None:
        """Answer a request that failed validation with the errno the spec asks for."""
        allowed = self._allowed[cmd] if cmd < _NCMDS else -1
        if allowed < 0:
            error, text = wire.NBD_EINVAL, b"unknown or unsupported command"
        elif flags & ~allowed:
            error, text = wire.NBD_EINVAL, b"flag not valid for this command"
        elif cmd == _FLUSH:
            error, text = wire.NBD_EINVAL, b"flush takes no offset or length"
        elif length > self._max_length[cmd]:
            error, text = wire.NBD_EINVAL, b"length above the maximum block size"
        elif cmd in (_WRITE, _WRITE_ZEROES):
            error, text = wire.NBD_ENOSPC, b"write beyond the end of the device"
        else:  # READ and TRIM past the end: EINVAL per the spec's error values section
            error, text = wire.NBD_EINVAL, b"request beyond the end of the device"
        self._send_error(cmd, handle, error, text)
        self._stats.observe(cmd, RESULT_INVALID, perf_counter() - t0)

    # --- replies ------------------------------------------------------------------------

    def _succeed(
        self, cmd: int, handle: int, offset: int, length: int, t0: float, result: Any
    ) -> None:
        stats = self._stats
        if cmd == _READ:
            if len(result) != length:
                log.error("backend pread returned %d bytes, wanted %d", len(result), length)
                self._fail(cmd, handle, wire.NBD_EIO, t0)
                return
            if self._structured:
                header = _pack_read(
                    _STRUCTURED_MAGIC, _DONE, _OFFSET_DATA, handle, length + _OFFSET_SIZE, offset
                )
            else:
                header = _pack_simple(_SIMPLE_MAGIC, 0, handle)
            self._emit(header)
            self._emit(result)
            stats.bytes_read += length
        else:
            self._emit(_pack_simple(_SIMPLE_MAGIC, 0, handle))
            if cmd == _WRITE:
                stats.bytes_written += length
        stats.observe(cmd, RESULT_OK, perf_counter() - t0)

    def _ok(self, cmd: int, handle: int, t0: float) -> None:
        self._emit(_pack_simple(_SIMPLE_MAGIC, 0, handle))
        self._stats.observe(cmd, RESULT_OK, perf_counter() - t0)

    def _failed(self, cmd: int, flags: int, handle: int, t0: float, exc: BaseException) -> None:
        if isinstance(exc, BackendError):
            error = wire.nbd_error(exc.errno)
            log.debug("backend error on command %d: %s", cmd, exc)
            # The spec reserves ENOTSUP for FAST_ZERO and EOVERFLOW for DF reads.
            if (error == wire.NBD_ENOTSUP and not flags & _FAST_ZERO) or (
                error == wire.NBD_EOVERFLOW and not flags & _DF
            ):
                error = wire.NBD_EINVAL
            text = exc.detail.encode(errors="replace")[: wire.MAX_STRING]
        else:
            log.error("backend raised on command %d", cmd, exc_info=exc)
            error, text = wire.NBD_EIO, b"internal error in the backend"
        self._send_error(cmd, handle, error, text)
        self._stats.observe(cmd, RESULT_ERROR, perf_counter() - t0)

    def _fail(self, cmd: int, handle: int, error: int, t0: float) -> None:
        self._send_error(cmd, handle, error, _ERROR_TEXT.get(error, b""))
        self._stats.observe(cmd, RESULT_ERROR, perf_counter() - t0)

    def _send_error(self, cmd: int, handle: int, error: int, text: bytes) -> None:
        if self._structured:
            # The spec requires a structured reply to every READ once negotiated and prefers
            # one for errors of any command: it carries a message for the user.
            payload = wire.ERROR_PAYLOAD.pack(error, len(text)) + text
            header = _pack_chunk(
                _STRUCTURED_MAGIC, _DONE, wire.REPLY_TYPE_ERROR, handle, len(payload)
            )
            self._emit(header + payload)
        else:
            self._emit(_pack_simple(_SIMPLE_MAGIC, error, handle))

    def _send_empty_read(self, handle: int) -> None:
        if self._structured:
            self._emit(_pack_chunk(_STRUCTURED_MAGIC, _DONE, wire.REPLY_TYPE_NONE, handle, 0))
        else:
            self._emit(_pack_simple(_SIMPLE_MAGIC, 0, handle))

    def _emit(self, part: bytes | bytearray | memoryview) -> None:
        if self._closing:
            return
        self._out.append(part)
        if len(part) >= JOIN_MAX:
            self._out_big = True
        if not self._batching and not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Write the replies collected so far with as few transport writes as possible."""
        self._flush_scheduled = False
        out = self._out
        if not out:
            return
        self._out = []
        transport = self._transport
        if self._closing or transport is None:
            return
        if len(out) == 1:
            transport.write(out[0])
        elif self._ctx.scatter_gather:
            transport.writelines(out)
        elif not self._out_big:
            transport.write(b"".join(out))
        else:
            small: list[bytes | bytearray | memoryview] = []
            for part in out:
                if len(part) < JOIN_MAX:
                    small.append(part)
                    continue
                if small:
                    transport.write(b"".join(small))
                    small = []
                transport.write(part)
            if small:
                transport.write(b"".join(small))
        self._out_big = False

    # --- flow control and closing -------------------------------------------------------

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
        self._pause(_PAUSE_INPUT_CLOSED)

    def _close_once_idle(self) -> None:
        if self._inflight:
            self._close_when_idle = True
        else:
            self._close()

    def _close(self) -> None:
        """Send what is queued, then close (in-flight replies, if any, are dropped)."""
        if self._closing:
            return
        self._flush()
        self._closing = True
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

    def abort(self) -> None:
        """Drop the connection now (shutdown drain timed out)."""
        self._closing = True
        if self._transport is not None:
            self._transport.abort()


def connection_factory(ctx: ExportContext) -> Callable[[], NbdConnection]:
    """Protocol factory for loop.create_server / create_unix_server."""
    return partial(NbdConnection, ctx)

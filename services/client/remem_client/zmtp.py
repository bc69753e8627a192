"""ZMTP 3.0, ZeroMQ's wire protocol, spoken from an asyncio loop: a DEALER without libzmq.

The client's plaintext links use it (`dealer.open_dealer` chooses it); it lives in the
client's package because nothing else speaks it: the services bind libzmq ROUTERs.

Why: libzmq moves every message through an I/O thread on each side, so one request and its
reply wake four threads besides the two that do the work. On the 2-vCPU VMs remem is
measured on, each wake-up costs far more than the work: a one-page GET round trip to a page
server took 353 us and 167 us of client CPU through pyzmq, and 281 us and 75 us through this
module (same server, same loop). A `remem up` page-in crosses one such hop.

Scope: the NULL security mechanism only, so plaintext links: `remem up`'s Unix sockets (in a
folder only its user can open) and `--insecure`. Curve links keep using libzmq. The peer is
any libzmq ROUTER (RFC 23/ZMTP 3.0; libzmq answers a 3.0 greeting in 3.0):

- greeting, 64 bytes each way: 0xFF, 8 bytes of padding, 0x7F, version 3.0, mechanism
  "NULL" padded to 20 bytes, as-server 0, 31 bytes of filler;
- handshake: each side sends a READY command, whose metadata names its Socket-Type
  (DEALER here; the peer must say ROUTER);
- then frames: a flags byte (MORE 1, LONG 2, COMMAND 4), the size in 1 byte (or 8, big-endian,
  with LONG), the body. A message is frames up to one without MORE.

Received frames are memoryviews into the receive buffer, never copied: a buffer is not
reused once filled; a new one is taken instead, so frames handed out stay valid for as long
as their holder keeps them.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, cast

import numpy as np

log = logging.getLogger("zmtp")

GREETING = (
    b"\xff" + bytes(8) + b"\x7f" + bytes([3, 0]) + b"NULL".ljust(20, b"\0") + b"\0" + bytes(31)
)
GREETING_BYTES = 64
_MORE, _LONG, _COMMAND = 1, 2, 4
_SIZE8 = struct.Struct(">Q")
_PROPERTY_SIZE = struct.Struct(">I")
# Frames above this are a protocol violation: the largest remem message is a 1024-page GET
# reply (4 MiB of data).
MAX_FRAME = 64 << 20
# Fresh receive buffers are this large, or larger for a bigger frame.
RX_CHUNK = 256 << 10
_SHORT_HEADERS = [bytes([flags, size]) for flags in (0, _MORE) for size in range(256)]


class ZmtpError(Exception):
    """The peer broke ZMTP (bad greeting, handshake or frame); the connection is dropped."""


def ready_command(socket_type: bytes) -> bytes:
    """A READY command frame naming our socket type."""
    body = b"\x05READY" + b"\x0bSocket-Type" + _PROPERTY_SIZE.pack(len(socket_type)) + socket_type
    return bytes([_COMMAND, len(body)]) + body


def check_greeting(greeting: memoryview) -> None:
    """Raise ZmtpError unless `greeting` is a ZMTP 3.x greeting of the NULL mechanism."""
    if greeting[0] != 0xFF or greeting[9] & 1 != 1:
        raise ZmtpError("not a ZMTP 3 greeting (bad signature)")
    if greeting[10] < 3:
        raise ZmtpError(f"ZMTP version {greeting[10]}.{greeting[11]}, 3 or later needed")
    mechanism = bytes(greeting[12:32]).rstrip(b"\0")
    if mechanism != b"NULL":
        raise ZmtpError(f"security mechanism {mechanism!r}; only NULL is spoken here")


def parse_command(body: memoryview) -> tuple[bytes, dict[bytes, bytes]]:
    """(name, properties) of a command frame; properties only for READY."""
    if not body.nbytes or body[0] + 1 > body.nbytes:
        raise ZmtpError("truncated command")
    name = bytes(body[1 : 1 + body[0]])
    properties: dict[bytes, bytes] = {}
    if name != b"READY":
        return name, properties
    at = 1 + body[0]
    while at < body.nbytes:
        key_size = body[at]
        if at + 1 + key_size + 4 > body.nbytes:
            raise ZmtpError("truncated READY property")
        key = bytes(body[at + 1 : at + 1 + key_size]).lower()
        at += 1 + key_size
        (value_size,) = _PROPERTY_SIZE.unpack_from(body, at)
        at += 4
        if at + value_size > body.nbytes:
            raise ZmtpError("truncated READY property value")
        properties[key] = bytes(body[at : at + value_size])
        at += value_size
    return name, properties


def zmtp_buffers(frames: Sequence[Any]) -> list[Any]:
    """Header and body buffers of one message, for `writelines` (bodies are not copied)."""
    out: list[Any] = []
    last = len(frames) - 1
    for index, frame in enumerate(frames):
        if isinstance(frame, bytes):
            body: Any = frame
        else:
            view = memoryview(frame)
            # A strided view (never made on the hot path) is sent as a contiguous copy.
            body = (view if view.c_contiguous else memoryview(bytes(view))).cast("B")
        size = len(body)
        more = _MORE if index < last else 0
        if size < 256:
            out.append(_SHORT_HEADERS[256 * more + size])
        else:
            out.append(bytes([more | _LONG]) + _SIZE8.pack(size))
        if size:
            out.append(body)
    return out


class FrameReader:
    """Incremental ZMTP parser over buffers it hands to the socket to fill.

    Use: `buffer()` for the next read, `advance(n)` once n bytes landed there; `advance`
    returns the messages completed (lists of memoryviews). Commands go to `on_command`.
    """

    def __init__(self, on_command: Callable[[bytes, dict[bytes, bytes]], None]) -> None:
        self._on_command = on_command
        self._buf = np.empty(RX_CHUNK, dtype=np.uint8)  # uninitialised: no memset
        self._view: memoryview = self._buf.data
        self._start = 0  # first byte not yet parsed
        self._end = 0  # first byte not yet filled
        self._greeted = False
        self._frames: list[memoryview] = []

    def buffer(self) -> memoryview:
        if self._end == len(self._view):
            self._renew(RX_CHUNK)
        return self._view[self._end :]

    def _renew(self, need: int) -> None:
        """Move the unparsed tail to a fresh buffer of at least `need` bytes; the old one
        stays whole for the frames that point into it."""
        tail = self._view[self._start : self._end]
        buf = np.empty(max(RX_CHUNK, need), dtype=np.uint8)
        view: memoryview = buf.data
        view[: tail.nbytes] = tail
        self._buf, self._view = buf, view
        self._start, self._end = 0, tail.nbytes

    def advance(self, nbytes: int) -> list[list[memoryview]]:
        self._end += nbytes
        messages: list[list[memoryview]] = []
        view = self._view
        while True:
            start, end = self._start, self._end
            if not self._greeted:
                if end - start < GREETING_BYTES:
                    return messages
                check_greeting(view[start : start + GREETING_BYTES])
                self._greeted = True
                self._start = start + GREETING_BYTES
                continue
            if end - start < 2:
                break
            flags = view[start]
            if flags & ~(_MORE | _LONG | _COMMAND):
                raise ZmtpError(f"frame flags {flags:#x} has reserved bits set")
            if flags & _LONG:
                if end - start < 9:
                    break
                (size,) = _SIZE8.unpack_from(view, start + 1)
                body_at = start + 9
            else:
                size = view[start + 1]
                body_at = start + 2
            if size > MAX_FRAME:
                raise ZmtpError(f"frame of {size} bytes, {MAX_FRAME} at most")
            if end - body_at < size:
                if body_at + size > len(view):
                    # The frame does not fit in what is left of this buffer: a fresh one
                    # sized for it takes the read, so even a 4 MiB frame is never copied.
                    self._renew(body_at - start + size)
                break
            body = view[body_at : body_at + size]
            self._start = body_at + size
            if flags & _COMMAND:
                self._on_command(*parse_command(body))
                continue
            self._frames.append(body)
            if not flags & _MORE:
                messages.append(self._frames)
                self._frames = []
        return messages


class DealerBusy(Exception):
    """A dealer did not take the message: not connected with too many queued, the socket's
    buffer is full (the peer is not reading), or the dealer is closed. Raised by every
    dealer's `send`, libzmq's (`dealer.LibzmqDealer`) too."""


class ZmtpDealer:
    """A DEALER connected to one ROUTER endpoint (tcp://HOST:PORT or ipc://PATH), on the
    running asyncio loop, reconnecting after a loss.

    `send` never blocks: it writes at once while the connection takes data, and queues up
    to `hwm` messages before the handshake or while the socket's buffer is above its
    high-water mark (a peer not reading), as a libzmq DEALER does; past that it raises
    DealerBusy. Every complete message received goes to `on_message`. Messages written to a
    connection that is then lost are lost: the caller's timeouts handle them, as with libzmq.

    Frames are sent without a copy: the buffers passed to `send` must not change until the
    message is written, which may be after `send` returns (queued, or a paused socket).
    """

    def __init__(
        self,
        endpoint: str,
        on_message: Callable[[list[memoryview]], None],
        *,
        hwm: int = 256,
        reconnect_interval: float = 0.1,
        on_violation: Callable[[ZmtpError], None] | None = None,
    ) -> None:
        if endpoint.startswith("ipc://"):
            self._path: str | None = endpoint[len("ipc://") :]
            self._host, self._port = "", 0
        elif endpoint.startswith("tcp://"):
            host, _, port = endpoint[len("tcp://") :].rpartition(":")
            self._path = None
            self._host, self._port = host.strip("[]"), int(port)
        else:
            raise ValueError(f"not a tcp:// or ipc:// endpoint: {endpoint}")
        self.endpoint = endpoint
        self._on_message = on_message
        self._on_violation = on_violation
        self._hwm = hwm
        self._interval = reconnect_interval
        self._loop = asyncio.get_running_loop()
        self._queue: list[list[Any]] = []
        self._transport: asyncio.Transport | None = None  # set once the handshake is done
        self._paused = False  # the transport's buffer is above its high-water mark
        self._closed = False
        # Connection attempts refused so far (no listener yet, or it went away): what a test
        # waits on to know the dealer kept retrying, instead of sleeping for it.
        self.refused_attempts = 0
        self._task = self._loop.create_task(self._run())

    @property
    def connected(self) -> bool:
        return self._transport is not None

    def send(self, frames: Sequence[Any]) -> None:
        transport = self._transport
        if transport is not None and not self._paused:
            transport.writelines(zmtp_buffers(frames))
            return
        if self._closed:
            raise DealerBusy(f"{self.endpoint}: closed")
        if len(self._queue) >= self._hwm:
            state = "not reading" if transport is not None else "not connected"
            raise DealerBusy(f"{self.endpoint}: {state}, {len(self._queue)} messages queued")
        self._queue.append(zmtp_buffers(frames))

    def close(self) -> None:
        self._closed = True
        self._queue.clear()
        self._task.cancel()
        if self._transport is not None:
            self._transport.abort()
            self._transport = None

    async def _run(self) -> None:
        while not self._closed:
            lost: asyncio.Future[None] = self._loop.create_future()
            factory = partial(_Connection, self, lost)
            try:
                if self._path is not None:
                    transport, _ = await self._loop.create_unix_connection(factory, self._path)
                else:
                    transport, _ = await self._loop.create_connection(
                        factory, self._host, self._port
                    )
            except OSError as exc:
                log.debug("cannot connect to %s: %s", self.endpoint, exc)
                self.refused_attempts += 1
                await asyncio.sleep(self._interval)  # reconnect interval, as libzmq's
                continue
            try:
                await lost
            finally:
                transport.abort()
                self._transport = None
            if not self._closed:
                await asyncio.sleep(self._interval)

    def _ready(self, transport: asyncio.Transport) -> None:
        """The handshake is done: send what queued meanwhile."""
        self._transport = transport
        self._drain()

    def _drain(self) -> None:
        """Write queued messages until the transport's buffer is full again."""
        transport, queue = self._transport, self._queue
        sent = 0
        while transport is not None and sent < len(queue) and not self._paused:
            transport.writelines(queue[sent])  # may call pause_writing, setting _paused
            sent += 1
        del queue[:sent]

    def _pause(self, paused: bool) -> None:
        self._paused = paused
        if not paused:
            self._drain()

    def _violation(self, exc: ZmtpError) -> None:
        log.warning("%s broke ZMTP: %s; reconnecting", self.endpoint, exc)
        if self._on_violation is not None:
            self._on_violation(exc)


class _Connection(asyncio.BufferedProtocol):
    """One connection of a ZmtpDealer: greeting, handshake, then messages."""

    def __init__(self, dealer: ZmtpDealer, lost: asyncio.Future[None]) -> None:
        self._dealer = dealer
        self._lost = lost
        self._reader = FrameReader(self._on_command)
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's stream transports are not asyncio.Transport subclasses, though alike.
        self._transport = cast(asyncio.Transport, transport)
        self._transport.write(GREETING + ready_command(b"DEALER"))

    def _on_command(self, name: bytes, properties: dict[bytes, bytes]) -> None:
        if name == b"READY":
            peer = properties.get(b"socket-type", b"")
            if peer != b"ROUTER":
                raise ZmtpError(f"peer socket type {peer!r}; a DEALER talks to a ROUTER")
            assert self._transport is not None
            self._dealer._ready(self._transport)
        elif name == b"ERROR":
            raise ZmtpError("peer sent ERROR")
        # Other commands (ZMTP 3.1's PING/PONG, SUBSCRIBE) are not sent to a 3.0 peer.

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._reader.buffer()

    def buffer_updated(self, nbytes: int) -> None:
        try:
            messages = self._reader.advance(nbytes)
        except ZmtpError as exc:
            self._dealer._violation(exc)
            assert self._transport is not None
            self._transport.abort()
            return
        on_message = self._dealer._on_message
        for frames in messages:
            on_message(frames)

    def pause_writing(self) -> None:
        if self._dealer._transport is self._transport:
            self._dealer._pause(True)

    def resume_writing(self) -> None:
        if self._dealer._transport is self._transport:
            self._dealer._pause(False)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._dealer._transport is self._transport:
            self._dealer._transport = None  # sends queue again until the next handshake
            self._dealer._paused = False
        if not self._lost.done():
            self._lost.set_result(None)


__all__ = ["DealerBusy", "FrameReader", "ZmtpDealer", "ZmtpError", "ready_command", "zmtp_buffers"]

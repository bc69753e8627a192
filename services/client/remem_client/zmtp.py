"""ZMTP 3.0, ZeroMQ's wire protocol, spoken from an asyncio loop: a DEALER without libzmq.

The client's plaintext links use it (`dealer.open_dealer` chooses it). The codec (greeting,
commands, framing) is `remem_common.zmtp`, shared with the page server's in-loop ROUTER.

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
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, cast

from remem_common.zmtp import (
    GREETING,
    FrameReader,
    ZmtpError,
    enlarge_unix_send_buffer,
    ready_command,
    zmtp_buffers,
)

log = logging.getLogger("zmtp")


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
    connection that is then lost are lost: `on_disconnect` is told as soon as the loss is
    seen (then the queue is dropped too: it went out with the connection, as far as the
    caller knows), else the caller's timeouts handle them, as with libzmq. After a loss and
    until the next handshake, `send` queues for the next connection, or raises DealerBusy
    with `refuse_while_reconnecting` (so a caller fails over at once instead of waiting for
    a server that may never come back).

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
        on_disconnect: Callable[[], None] | None = None,
        refuse_while_reconnecting: bool = False,
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
        self._on_disconnect = on_disconnect
        self._refuse_while_reconnecting = refuse_while_reconnecting
        self._reconnecting = False  # refusing sends: lost, and no handshake done since
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
        # A transport that saw its peer go is closing until connection_lost runs, a loop
        # turn or more later: uvloop's raises on a write then, asyncio's drops it.
        if transport is not None and not self._paused and not transport.is_closing():
            transport.writelines(zmtp_buffers(frames))
            return
        if self._closed:
            raise DealerBusy(f"{self.endpoint}: closed")
        if self._refuse_while_reconnecting and (
            self._reconnecting or (transport is not None and transport.is_closing())
        ):
            raise DealerBusy(f"{self.endpoint}: connection lost, reconnecting")
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
        self._reconnecting = False
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

    def _disconnected(self) -> None:
        """The connection the handshake was done on is gone, and what was written to it."""
        self._transport = None  # sends queue (or are refused) until the next handshake
        self._paused = False
        if self._on_disconnect is None or self._closed:
            return
        self._queue.clear()
        self._reconnecting = self._refuse_while_reconnecting
        log.info("lost the connection to %s; reconnecting", self.endpoint)
        self._on_disconnect()


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
        # A page-out batch of up to 4 MiB leaves in one piece.
        enlarge_unix_send_buffer(transport.get_extra_info("socket"))
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
        if self._transport is not None and self._dealer._transport is self._transport:
            self._dealer._disconnected()
        if not self._lost.done():
            self._lost.set_result(None)


__all__ = ["DealerBusy", "FrameReader", "ZmtpDealer", "ZmtpError", "ready_command", "zmtp_buffers"]

"""A ROUTER without libzmq: ZMTP 3.0 served from its owner's thread (the page server's loop,
the mirror's).

Why: a libzmq socket moves every message through its I/O thread, so each request and its
reply wake that thread and switch to it and back. Profiled under fio 4K random reads through
`remem up`, a page server spent 28% of its CPU in libzmq's I/O thread and 17% switching
between it and the loop. Here the loop reads and writes the kernel sockets itself: one
epoll wait, one recv_into and one sendmsg per wake-up, however many messages they carry.

Scope: the NULL mechanism (plaintext: `remem up`'s Unix sockets, `--insecure`) on ipc:// to a
path and tcp:// to an IP address or `*`; `router.open_router` picks it, or libzmq (Curve,
other endpoints), once at start. Any ZMTP 3 peer talks to it: the client's in-loop DEALER
(`remem_client.zmtp`), libzmq DEALER, REQ and ROUTER sockets (placement, other page servers'
slab pushes, admin tools). The codec is `remem_common.zmtp`. The page server serves its
ROUTER with it, and so does the mirror (`keep_frames`: its writer thread holds the pages).

What it keeps of libzmq's ROUTER, since peers rely on it:

- routing ids: the peer's Identity property if it sent a non-empty one, else 5 bytes (0x00
  and a counter from a random start). A second connection asking for an id already in use
  is closed (libzmq, without ROUTER_HANDOVER, ignores it);
- a message to an id with no connection (a peer gone) is dropped silently
  (ROUTER_MANDATORY off);
- a peer whose kernel buffer is full gets its messages queued, up to `hwm` (libzmq's
  default SNDHWM, 1000); a message past that is dropped, as libzmq's ROUTER drops on a full
  pipe, and `send` says so;
- ipc: a socket file left at the path (a killed predecessor) is replaced at bind, and
  removed at unbind unless another process has bound the path since;
- a connection that has not finished its handshake within 30 s (libzmq's HANDSHAKE_IVL) is
  closed; so is one that breaks ZMTP (counted by `on_violation`), never the server.

Data path: one level-triggered epoll set over the listener and every connection; its own fd
is what the page server's zmq.Poller watches beside the slab pushes' libzmq sockets. A
readable connection gets one recv_into per wake-up into its reader's reusable buffer (so a
busy peer cannot starve the others; only a large message is read on through, a few MiB at
most); the messages completed are handled right away, and
their frames point into that buffer, so a handler must be done with them when it returns
(with `keep_frames`, each buffer is filled once and left to the frames that point into it,
so a handler may queue them for another thread).
Replies written meanwhile are gathered per peer and written by one sendmsg after the read's
messages (header and body buffers, pages not copied); what the kernel does not take waits
in the peer's queue, with EPOLLOUT armed until it is written.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import random
import select
import socket
import stat
import time
from collections import deque
from collections.abc import Callable, Sequence
from functools import partial
from itertools import count
from typing import Any

from remem_common.zmtp import (
    GREETING,
    FrameReader,
    ZmtpError,
    enlarge_unix_send_buffer,
    pong_command,
    ready_command,
    zmtp_buffers,
)

log = logging.getLogger("zmtp")

Frames = list[Any]
Handler = Callable[[Frames], None]

# libzmq's defaults for a ROUTER: messages queued per peer, listen backlog, handshake time.
HWM = 1000
BACKLOG = 100
HANDSHAKE_TIMEOUT = 30.0
# Connections accepted per wake-up, so a flood of connects cannot stall the data path.
ACCEPT_BURST = 64
# A read of at least this many bytes that completed no message is followed by another in
# the same wake-up, up to LARGE_READS reads (a peer's large message, not many peers' small
# ones).
LARGE_READ = 32 << 10
LARGE_READS = 64
# Replies gathered from one read before they are written anyway: bounds a cork's queue.
CORK_MESSAGES = 64
_IOV_MAX = os.sysconf("SC_IOV_MAX")
_IN, _OUT = select.EPOLLIN, select.EPOLLIN | select.EPOLLOUT
_PEER_TYPES = (b"DEALER", b"REQ", b"ROUTER")
_HELLO = GREETING + ready_command(b"ROUTER")


class _Refused(Exception):
    """Close the connection without counting a violation: its routing id is taken, or the
    peer sent ERROR."""


class _Peer:
    """One accepted connection: its socket, reader, routing id and unwritten messages."""

    __slots__ = ("accepted", "blocked", "dirty", "out", "reader", "routing_id", "sock")

    def __init__(self, sock: socket.socket, router: ZmtpRouter) -> None:
        self.sock = sock
        # Reusing its buffer unless the handler keeps frames: the router hands each message
        # to its handler before it reads on.
        self.reader = FrameReader(partial(router._on_command, self), reuse=not router.keep_frames)
        self.routing_id: bytes | None = None  # set by the peer's READY
        # Messages not yet (wholly) written: each a list of buffers; the first may have lost
        # a written prefix.
        self.out: deque[list[Any]] = deque()
        self.blocked = False  # the kernel took less than offered: EPOLLOUT is armed
        self.dirty = False  # has messages gathered during a read, to write after it
        self.accepted = time.monotonic()


class ZmtpRouter:
    """A ZMTP 3.0 ROUTER bound to one endpoint, driven by its owner's loop (one thread)."""

    def __init__(
        self,
        *,
        hwm: int = HWM,
        on_violation: Callable[[ZmtpError], None] | None = None,
        keep_frames: bool = False,
    ) -> None:
        self.hwm = hwm
        self.keep_frames = keep_frames
        # Replies gathered during a read are written at the latest when this many wait, so
        # the high-water mark also holds for what a cork gathers.
        self._cork_limit = min(CORK_MESSAGES, hwm)
        self._on_violation = on_violation
        self._epoll = select.epoll()
        self._listener: socket.socket | None = None
        self._tcp = False
        self._ipc_path: str | None = None
        self._ipc_inode: tuple[int, int] | None = None  # (st_dev, st_ino) of our socket file
        self._peers: dict[int, _Peer] = {}  # by fd
        self._by_id: dict[bytes, _Peer] = {}
        self._ids = count(random.getrandbits(31))
        self._corked = False
        self._dirty: list[_Peer] = []
        self._next_sweep = time.monotonic() + HANDSHAKE_TIMEOUT
        # Counted for tests and logs: connections closed for breaking ZMTP, messages dropped
        # at the high-water mark.
        self.violations = 0
        self.dropped = 0

    @property
    def pollable(self) -> int:
        """The epoll set's fd: readable while a connection or the listener has an event."""
        return self._epoll.fileno()

    # -- binding ---------------------------------------------------------------------------

    def bind(self, endpoint: str) -> str:
        """Listen on `endpoint`; returns it as libzmq's LAST_ENDPOINT would (port chosen)."""
        if self._listener is not None:
            raise OSError(errno.EADDRINUSE, "this ROUTER is bound already")
        if not speaks_zmtp(endpoint):
            raise OSError(errno.EINVAL, f"not an endpoint ZMTP binds here: {endpoint}")
        if endpoint.startswith("ipc://"):
            bound = self._bind_ipc(endpoint[len("ipc://") :])
        else:
            bound = self._bind_tcp(endpoint[len("tcp://") :])
        assert self._listener is not None
        self._epoll.register(self._listener.fileno(), _IN)
        return bound

    def _bind_ipc(self, path: str) -> str:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    os.unlink(path)  # left by a predecessor that did not unbind (as libzmq)
            listener.bind(path)
            listener.listen(BACKLOG)
            listener.setblocking(False)
            info = os.stat(path)
        except BaseException:
            listener.close()
            raise
        self._listener, self._ipc_path = listener, path
        self._ipc_inode = (info.st_dev, info.st_ino)
        return f"ipc://{path}"

    def _bind_tcp(self, address: str) -> str:
        host, _, port = address.rpartition(":")
        host = "0.0.0.0" if host == "*" else host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((host, 0 if port in ("*", "0") else int(port)))
            listener.listen(BACKLOG)
            listener.setblocking(False)
        except BaseException:
            listener.close()
            raise
        self._listener, self._tcp = listener, True
        shown = f"[{host}]" if family == socket.AF_INET6 else host
        return f"tcp://{shown}:{listener.getsockname()[1]}"

    def unbind(self) -> None:
        """Stop accepting (connections already made stay); remove our ipc socket file."""
        listener, self._listener = self._listener, None
        if listener is None:
            return
        with contextlib.suppress(OSError):
            self._epoll.unregister(listener.fileno())
        listener.close()
        path, self._ipc_path = self._ipc_path, None
        if path is not None:
            with contextlib.suppress(OSError):
                info = os.lstat(path)
                if (info.st_dev, info.st_ino) == self._ipc_inode:
                    os.unlink(path)  # not if a successor has bound the path since

    def close(self, linger_ms: int = 0) -> None:
        """Unbind and close every connection; messages not yet written get up to `linger_ms`
        to leave (as libzmq's LINGER), then are dropped."""
        self.unbind()
        if linger_ms > 0:
            self._linger(time.monotonic() + linger_ms / 1000)
        for peer in list(self._peers.values()):
            self._close(peer)
        self._epoll.close()

    def _linger(self, deadline: float) -> None:
        """Write queued messages until done or `deadline` (nothing is read meanwhile)."""
        while (waiting := [peer for peer in self._peers.values() if peer.out]) and (
            left := deadline - time.monotonic()
        ) > 0:
            poller = select.poll()
            by_fd = {peer.sock.fileno(): peer for peer in waiting}
            for fd in by_fd:
                poller.register(fd, select.POLLOUT)
            for fd, _event in poller.poll(left * 1000):
                self._flush(by_fd[fd])  # closes the peer if it is gone

    # -- serving ---------------------------------------------------------------------------

    def serve(self, handle: Handler, timeout_ms: int) -> int:
        """Wait up to `timeout_ms` for events, then handle them: each message received goes to
        `handle` as `[routing_id, *frames]`. Returns the number of messages handled."""
        events = self._epoll.poll(timeout_ms / 1000)
        handled = self._process(events, handle) if events else 0
        if time.monotonic() > self._next_sweep:
            self._sweep_handshakes()
        return handled

    def drain(self, handle: Handler, reads: int = -1) -> int:
        """Handle what is waiting, without blocking (`serve` with no wait); from at most
        `reads` connections' reads (each read's messages all go to `handle`), if positive."""
        events = self._epoll.poll(0, reads)
        return self._process(events, handle) if events else 0

    def _process(self, events: list[tuple[int, int]], handle: Handler) -> int:
        handled = 0
        listener = self._listener
        listener_fd = listener.fileno() if listener is not None else -1
        for fd, event in events:
            peer = self._peers.get(fd)
            if peer is None:
                if fd == listener_fd:
                    self._accept()
                continue  # closed earlier in this batch
            if event & select.EPOLLOUT:
                self._flush(peer)
                if peer.sock.fileno() < 0:
                    continue
            if event & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                handled += self._read(peer, handle)
        return handled

    def _read(self, peer: _Peer, handle: Handler) -> int:
        try:
            for _ in range(LARGE_READS):
                buffer = peer.reader.buffer()
                nbytes = peer.sock.recv_into(buffer)
                if not nbytes:
                    self._close(peer)
                    return 0
                messages = peer.reader.advance(nbytes)
                # Read on through a large message while its bytes keep coming: a wake-up
                # (poll, epoll, Python) per socket buffer's worth cost the mirror more user
                # time per 4 MiB batch than libzmq's I/O thread did. But a read that took
                # less than offered emptied the socket, and the next one nearly always
                # failed (EAGAIN: a syscall and an exception per wake-up), so stop there.
                if messages or nbytes < LARGE_READ or nbytes < len(buffer):
                    break
            if messages and peer.routing_id is None:
                raise ZmtpError("a message before the peer's READY")
        except (BlockingIOError, InterruptedError):
            return 0
        except ZmtpError as exc:
            self.violations += 1
            log.warning("a peer broke ZMTP, closing its connection: %s", exc)
            if self._on_violation is not None:
                self._on_violation(exc)
            self._close(peer)
            return 0
        except _Refused as exc:
            log.info("closing a connection: %s", exc)
            self._close(peer)
            return 0
        except OSError:
            self._close(peer)  # reset by the peer
            return 0
        if not messages:
            return 0
        routing_id = peer.routing_id
        self._corked = True
        try:
            for frames in messages:
                if frames[0].nbytes:
                    frames = _copy_envelope(frames)
                handle([routing_id, *frames])
        finally:
            self._corked = False
            self._flush_dirty()
        return len(messages)

    def _on_command(self, peer: _Peer, name: bytes, properties: dict[bytes, bytes]) -> None:
        if name == b"READY":
            if peer.routing_id is not None:
                raise ZmtpError("a second READY")
            socket_type = properties.get(b"socket-type", b"")
            if socket_type not in _PEER_TYPES:
                raise ZmtpError(
                    f"peer socket type {socket_type!r}; a ROUTER talks to DEALER, REQ or ROUTER"
                )
            routing_id = properties.get(b"identity", b"")
            if not routing_id:
                routing_id = b"\0" + (next(self._ids) & 0xFFFFFFFF).to_bytes(4, "big")
            elif routing_id in self._by_id:
                raise _Refused(f"routing id {routing_id!r} is in use by another connection")
            peer.routing_id = routing_id
            self._by_id[routing_id] = peer
        elif name == b"PING":
            self._queue(peer, [pong_command(properties)])
        elif name == b"ERROR":
            raise _Refused("the peer sent ERROR")
        # SUBSCRIBE, CANCEL (PUB/SUB only) and PONG need nothing.

    def _accept(self) -> None:
        listener = self._listener
        assert listener is not None
        for _ in range(ACCEPT_BURST):
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: the connection waits in the backlog
                log.warning("cannot accept a connection: %s", exc)
                return
            sock.setblocking(False)
            if self._tcp:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            enlarge_unix_send_buffer(sock)  # replies of a 4 MiB batch leave in one piece
            peer = _Peer(sock, self)
            self._peers[sock.fileno()] = peer
            self._epoll.register(sock.fileno(), _IN)
            self._queue(peer, [_HELLO])

    def _sweep_handshakes(self) -> None:
        now = time.monotonic()
        self._next_sweep = now + 1.0
        for peer in list(self._peers.values()):
            if peer.routing_id is None and now - peer.accepted > HANDSHAKE_TIMEOUT:
                log.info("closing a connection that did not finish its handshake")
                self._close(peer)

    # -- sending ---------------------------------------------------------------------------

    def send(self, frames: Sequence[Any]) -> bool:
        """Send `frames[1:]` to the peer whose routing id is `frames[0]`; never blocks.

        Returns False when the message was dropped because that peer's queue is at the
        high-water mark; a message to a peer that is gone is dropped silently (True), as a
        libzmq ROUTER does. The buffers must not change until written (they are not copied).
        """
        peer = self._by_id.get(frames[0])
        if peer is None:
            return True
        if peer.blocked and len(peer.out) >= self.hwm:
            self.dropped += 1
            return False
        self._queue(peer, zmtp_buffers(frames[1:]))
        return True

    def send_all(self, messages: Sequence[Sequence[Any]]) -> int:
        """`send` each message; each peer's are written by one sendmsg. Returns how many
        were dropped at the high-water mark."""
        dropped = 0
        corked, self._corked = self._corked, True
        try:
            for frames in messages:
                dropped += not self.send(frames)
        finally:
            self._corked = corked
            if not corked:
                self._flush_dirty()
        return dropped

    def _queue(self, peer: _Peer, buffers: list[Any]) -> None:
        peer.out.append(buffers)
        if peer.blocked:
            return  # written when the kernel takes more (EPOLLOUT)
        if not self._corked or len(peer.out) >= self._cork_limit:
            self._flush(peer)
        elif not peer.dirty:
            peer.dirty = True
            self._dirty.append(peer)

    def _flush_dirty(self) -> None:
        dirty, self._dirty = self._dirty, []
        for peer in dirty:
            peer.dirty = False
            if peer.out and peer.sock.fileno() >= 0:
                self._flush(peer)

    def _flush(self, peer: _Peer) -> None:
        """Write the peer's queue until done or the kernel takes no more."""
        out = peer.out
        while out:
            iov = out[0] if len(out) == 1 else [buffer for message in out for buffer in message]
            whole = len(iov) <= _IOV_MAX
            if not whole:
                iov = iov[:_IOV_MAX]
            try:
                sent = peer.sock.sendmsg(iov)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._close(peer)  # the peer is gone; its messages with it
                return
            offered = sum(map(len, iov))
            if whole and sent == offered:
                out.clear()
                break
            _consume(out, sent)
            if sent < offered:
                break
        if out and not peer.blocked:
            peer.blocked = True
            self._epoll.modify(peer.sock.fileno(), _OUT)
        elif not out and peer.blocked:
            peer.blocked = False
            self._epoll.modify(peer.sock.fileno(), _IN)

    def _close(self, peer: _Peer) -> None:
        fd = peer.sock.fileno()
        if fd < 0:
            return
        self._peers.pop(fd, None)
        with contextlib.suppress(OSError):
            self._epoll.unregister(fd)
        peer.sock.close()
        peer.out.clear()
        if peer.routing_id is not None and self._by_id.get(peer.routing_id) is peer:
            del self._by_id[peer.routing_id]


def _copy_envelope(frames: list[memoryview]) -> list[Any]:
    """The frames before the empty delimiter (routing ids of a peer behind a proxy) as bytes:
    a reply carries them back and may wait in the queue after the buffer is reused."""
    for index, frame in enumerate(frames):
        if not frame.nbytes:
            return [bytes(part) for part in frames[:index]] + frames[index:]
    return frames  # no delimiter: refused as malformed, nothing is kept


def _consume(out: deque[list[Any]], sent: int) -> None:
    """Drop `sent` written bytes from the front of the queue."""
    while sent:
        message = out[0]
        for index, buffer in enumerate(message):
            size = len(buffer)
            if sent < size:
                message[index] = memoryview(buffer)[sent:]
                del message[:index]
                return
            sent -= size
        out.popleft()


def speaks_zmtp(endpoint: str) -> bool:
    """Whether `ZmtpRouter` binds `endpoint`: ipc:// to a path (not libzmq's abstract
    `@name` or its `*`), or tcp:// to `*` or an IP address (libzmq alone resolves interface
    and host names), with a port number or `*`."""
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://") :]
        return bool(path) and not path.startswith(("@", "*"))
    if not endpoint.startswith("tcp://"):
        return False
    host, _, port = endpoint[len("tcp://") :].rpartition(":")
    if not (port == "*" or port.isdigit()):
        return False
    if host == "*":
        return True
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True

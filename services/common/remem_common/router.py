"""A service's data socket: one ROUTER that all its peers talk to (the page server's, the
mirror's).

`open_router` picks the implementation once, at start, so nothing on the hot path branches
on it (as the client's `remem_client.dealer.open_dealer` does for its DEALERs):

- plaintext, to an ipc:// path or a tcp:// IP address (`remem up`'s Unix sockets,
  `--insecure`): `zmtp_router.ZmtpRouter`, ZMTP served from the service's own thread, with
  no libzmq I/O thread to wake for each message (zmtp_router.py says why);
- Curve (libzmq alone implements its mechanism here), or an endpoint only libzmq binds (a
  host or interface name, ipc://@abstract): `LibzmqRouter`, a libzmq ROUTER.

Both are driven the same way by the service's loop: `serve` waits for and handles
messages, `drain` handles what is waiting, `send` answers; `pollable` is what a zmq.Poller
watches when the loop also waits for something else (the page server's slab pushes, the
mirror's writer replies).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import zmq

from remem_common.security import Security
from remem_common.zmq_io import has_message, recv_frames, send_frames
from remem_common.zmtp import ZmtpError
from remem_common.zmtp_router import ZmtpRouter, speaks_zmtp

Handler = Callable[[list[Any]], None]
# Messages taken from a libzmq ROUTER per wake-up before timers and push replies get a turn.
MAX_BURST = 256


class Router(Protocol):
    """A service's ROUTER, whichever implementation; every call from its loop thread.

    Messages reach the handler as `[routing_id, b"", header, *payload]`; the frames are valid
    until the handler returns (copy what is kept longer), unless the router was opened with
    `keep_frames`.
    """

    @property
    def pollable(self) -> zmq.Socket[bytes] | int:
        """What a zmq.Poller watches for this router's input (a socket or an fd)."""
        ...

    def bind(self, endpoint: str) -> str:
        """Bind; returns the endpoint bound (with the port chosen)."""
        ...

    def serve(self, handle: Handler, timeout_ms: int) -> int:
        """Wait up to `timeout_ms` for messages and handle them; returns how many."""
        ...

    def drain(self, handle: Handler, reads: int = MAX_BURST) -> int:
        """Handle the messages waiting, without blocking; returns how many. At most `reads`
        receives: a libzmq ROUTER's take one message each, the ZMTP router's the messages
        one read of a connection completed (so a loop can stop reading when it must)."""
        ...

    def send(self, frames: Sequence[Any]) -> bool:
        """Send `[routing_id, *message]` without blocking; False if dropped at the
        high-water mark (a peer that is gone is dropped silently, True)."""
        ...

    def send_all(self, messages: Sequence[Sequence[Any]]) -> int:
        """`send` each message, written together where the router can (one write per peer);
        returns how many were dropped at the high-water mark."""
        ...

    def unbind(self) -> None:
        """Stop taking new connections."""
        ...

    def close(self, linger_ms: int = 0) -> None:
        """Close; messages not yet written get up to `linger_ms` to leave."""
        ...


def open_router(
    endpoint: str,
    context: zmq.Context[zmq.Socket[bytes]],
    security: Security,
    *,
    on_violation: Callable[[ZmtpError], None] | None = None,
    keep_frames: bool = False,
) -> Router:
    """The router that will bind `endpoint`: ZMTP from the loop when the link is plaintext and
    ZMTP binds the endpoint, else libzmq. `on_violation` is told about each connection the
    ZMTP router closes for breaking the protocol (libzmq drops such peers without telling).
    `keep_frames`: the handler may keep the frames it is given past its return (a libzmq
    ROUTER's frames always may be kept)."""
    if not security.enabled and speaks_zmtp(endpoint):
        return ZmtpRouter(on_violation=on_violation, keep_frames=keep_frames)
    return LibzmqRouter(context, security)


class LibzmqRouter:
    """A libzmq ROUTER. While no push runs, the loop blocks in recv on it alone: on these VMs
    a zmq_poll wake-up adds ~100 us to every round trip that a blocking recv does not."""

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], security: Security) -> None:
        self.socket: zmq.Socket[bytes] = context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        # A client that vanished must not make us block or raise; its replies are dropped.
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 0)
        security.server_socket(self.socket)
        self._rcvtimeo = -1  # the socket's RCVTIMEO, set only when it changes

    @property
    def pollable(self) -> zmq.Socket[bytes]:
        return self.socket

    def bind(self, endpoint: str) -> str:
        self.socket.bind(endpoint)
        bound = self.socket.getsockopt(zmq.LAST_ENDPOINT)
        assert isinstance(bound, bytes)
        return bound.decode()

    def serve(self, handle: Handler, timeout_ms: int) -> int:
        if timeout_ms != self._rcvtimeo:
            self.socket.setsockopt(zmq.RCVTIMEO, timeout_ms)
            self._rcvtimeo = timeout_ms
        try:
            frames = recv_frames(self.socket, block=True)
        except zmq.Again:
            return 0
        handle(frames)
        return 1 + self.drain(handle)

    def drain(self, handle: Handler, reads: int = MAX_BURST) -> int:
        handled = 0
        sock = self.socket
        # Asking EVENTS first: a zmq.Again raised at the end of every burst cost ~3% of a
        # one-page GET's CPU (exception and enum objects).
        while handled < reads and has_message(sock):
            try:
                frames = recv_frames(sock)
            except zmq.Again:
                break
            handled += 1
            handle(frames)
        return handled

    def send(self, frames: Sequence[Any]) -> bool:
        try:
            send_frames(self.socket, frames)
        except zmq.Again:
            return False
        return True

    def send_all(self, messages: Sequence[Sequence[Any]]) -> int:
        return sum(not self.send(frames) for frames in messages)

    def unbind(self) -> None:
        endpoint = self.socket.getsockopt(zmq.LAST_ENDPOINT)
        assert isinstance(endpoint, bytes)
        with contextlib.suppress(zmq.ZMQError):
            self.socket.unbind(endpoint.decode())

    def close(self, linger_ms: int = 0) -> None:
        self.socket.close(linger=linger_ms)

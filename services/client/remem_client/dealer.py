"""The client's asyncio DEALER to a ROUTER, and the table of its requests waiting for replies.

Every link of the client (to a page server, the mirror, placement) is a `Dealer` plus a
`PendingRequests`; the links keep only their batching and state.

`Dealer`: `send(frames)` never blocks (it raises `DealerBusy` when the message cannot be
taken), every message received goes to the `on_message` callback given at construction,
`close()` stops both. A lost connection (the peer was killed, or restarted) is told to the
`on_disconnect` callback at once: no reply will come to what was sent before, and the link
fails it then instead of after its timeout. The dealer reconnects by itself; until it has,
`send` queues for the next connection, or with `refuse_while_reconnecting` raises
DealerBusy (a page server link fails the request over at once instead). `open_dealer` picks
the implementation once, when the link opens, so nothing on the hot path branches on it:

- plaintext tcp:// or ipc:// (`remem up`'s Unix sockets, `--insecure`): `zmtp.ZmtpDealer`,
  ZMTP 3.0 spoken from the event loop without libzmq's I/O thread (zmtp.py says why);
- Curve (libzmq alone implements its mechanism here), or an endpoint ZMTP cannot reach
  from the loop (inproc://, ipc://@abstract): `LibzmqDealer`, a libzmq DEALER whose FD
  the event loop watches (and the FD of its socket monitor, which tells of losses).

`Link`: the base of the links, which builds the two from what each link names.

`PendingRequests`: ids for requests, each sent request's future and deadline by
msg_id, and replies decoded and matched to their request by parent_id. A request expires
at most once, and then its link decides what fails. Dropped replies are counted in the
client's `MalformedReplies` under the link's peer: one that does not decode, or a ZMTP
violation of the peer, in `client_malformed_messages_total{peer,reason}`; one whose request
is no longer waiting (expired, failed or abandoned) in `client_late_replies_total{peer}`.

Per request batch the table costs two method calls and a dict entry (one timer serves the
whole table); per page nothing.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar

import zmq
from remem_common.framing import decode
from remem_common.protocol.envelope import ErrorCode, ProtocolError, Reply
from remem_common.zmq_io import has_message, recv_frames, send_frames
from zmq.utils.monitor import parse_monitor_message

from remem_client.zmtp import DealerBusy, ZmtpDealer, ZmtpError

if TYPE_CHECKING:
    from pydantic import TypeAdapter
    from remem_common.security import Security

    from remem_client.metrics import MalformedReplies

log = logging.getLogger("client.dealer")

ReplyT = TypeVar("ReplyT", bound=Reply)
OnMessage = Callable[[list[Any]], None]
# What a LibzmqDealer's socket monitor reports: a connection up (its handshake done, Curve's
# included) and a connection gone. A loss before the handshake lost no message.
_CONNECTION_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
# Monitors publish on inproc endpoints, whose names must be unique in their context.
_monitor_ids = itertools.count(1)


class Dealer(Protocol):
    """One DEALER connected to one ROUTER endpoint, on the running loop."""

    endpoint: str

    def send(self, frames: Sequence[Any]) -> None:
        """Send one message (`[b"", header, *payload]`) or raise DealerBusy. The buffers
        must not change until the message is written (ZMTP sends them without a copy).
        Once `on_disconnect` was told of a loss, a message sent before is never answered."""
        ...

    def close(self) -> None:
        """Stop sending and receiving; queued messages are dropped."""
        ...


def speaks_zmtp(endpoint: str) -> bool:
    """Whether `zmtp.ZmtpDealer` can reach `endpoint` from the loop: tcp://, or ipc:// to a
    path (libzmq's ipc://@name is an abstract socket)."""
    return endpoint.startswith("tcp://") or (
        endpoint.startswith("ipc://") and not endpoint.startswith("ipc://@")
    )


def open_dealer(
    endpoint: str,
    on_message: OnMessage,
    *,
    context: zmq.Context[zmq.Socket[bytes]],
    security: Security | None,
    server_key: str | None = None,
    hwm: int,
    on_violation: Callable[[ZmtpError], None] | None = None,
    on_disconnect: Callable[[], None] | None = None,
    refuse_while_reconnecting: bool = False,
) -> Dealer:
    """Connect a DEALER to `endpoint`: ZMTP from the loop when the link is plaintext and
    ZMTP reaches it, else libzmq (Curve with `server_key`, the server's z85 public key).

    Args:
        on_message: called with each message's frames (memoryviews or zmq.Frames, never
            copied; valid for as long as the callee keeps them).
        hwm: messages the dealer queues toward a server that does not take them before
            `send` raises DealerBusy (libzmq's SNDHWM and RCVHWM).
        on_violation: told about each ZMTP violation of the peer (the connection is then
            dropped and made anew); libzmq drops such peers without telling.
        on_disconnect: told, once per loss, that a connection that was up is gone: the
            messages sent before will never be answered (queued ones are dropped). The
            dealer reconnects meanwhile. Without it, losses show only as timeouts.
        refuse_while_reconnecting: after a loss and until the next connection is up, `send`
            raises DealerBusy instead of queueing. Before the first connection messages
            queue regardless: a link sends its first requests before the handshake is done.

    Raises:
        KeyFileError: Curve is on and `server_key` is missing.
    """
    if (security is None or not security.enabled) and speaks_zmtp(endpoint):
        return ZmtpDealer(
            endpoint,
            on_message,
            hwm=hwm,
            on_violation=on_violation,
            on_disconnect=on_disconnect,
            refuse_while_reconnecting=refuse_while_reconnecting,
        )
    return LibzmqDealer(
        endpoint,
        on_message,
        context=context,
        hwm=hwm,
        security=security,
        server_key=server_key,
        on_disconnect=on_disconnect,
        refuse_while_reconnecting=refuse_while_reconnecting,
    )


class LibzmqDealer:
    """A libzmq DEALER driven from the event loop's reader callback on its FD.

    That FD is edge-triggered: every wake-up reads until no message is waiting, and after a
    send (which may have taken the edge of a waiting reply) the loop looks once more.

    With `on_disconnect`, a socket monitor (a PAIR socket libzmq publishes the DEALER's
    connection events on) is watched the same way: a DISCONNECTED after a completed
    handshake is a loss. libzmq reconnects by itself; its HANDSHAKE_SUCCEEDED ends the loss.
    Inproc connections have no events (nor losses).
    """

    def __init__(
        self,
        endpoint: str,
        on_message: OnMessage,
        *,
        context: zmq.Context[zmq.Socket[bytes]],
        hwm: int,
        security: Security | None = None,
        server_key: str | None = None,
        on_disconnect: Callable[[], None] | None = None,
        refuse_while_reconnecting: bool = False,
    ) -> None:
        sock: zmq.Socket[bytes] = context.socket(zmq.DEALER)
        monitor: zmq.Socket[bytes] | None = None
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, hwm)
            sock.setsockopt(zmq.RCVHWM, hwm)
            if security is not None:
                security.client_socket(sock, server_key)
            if on_disconnect is not None:
                # Before connecting: the first connection's events would be lost otherwise.
                monitor = sock.get_monitor_socket(
                    _CONNECTION_EVENTS, f"inproc://remem-dealer-monitor-{next(_monitor_ids)}"
                )
                monitor.setsockopt(zmq.LINGER, 0)
            sock.connect(endpoint)
            fd = sock.getsockopt(zmq.FD)
            monitor_fd = monitor.getsockopt(zmq.FD) if monitor is not None else None
        except Exception:
            if monitor is not None:
                sock.disable_monitor()
                monitor.close(linger=0)
            sock.close(linger=0)
            raise
        assert isinstance(fd, int)
        self.endpoint = endpoint
        self._socket = sock
        self._fd = fd
        self._on_message = on_message
        self._on_disconnect = on_disconnect
        self._refuse_while_reconnecting = refuse_while_reconnecting
        self._loop = asyncio.get_running_loop()
        self._check_due = False
        self._closed = False
        self._up = False  # a connection's handshake is done, and it was not lost since
        self._reconnecting = False  # refusing sends: lost, and not connected again yet
        self._loop.add_reader(fd, self._on_readable)
        self._monitor = monitor
        self._monitor_fd = -1
        if monitor is not None:
            assert isinstance(monitor_fd, int)
            self._monitor_fd = monitor_fd
            self._loop.add_reader(monitor_fd, self._on_connection_event)
            # The FD is edge-triggered: an event that came before the reader was added
            # would not wake the loop.
            self._loop.call_soon(self._on_connection_event)

    def send(self, frames: Sequence[Any]) -> None:
        if self._closed:
            raise DealerBusy(f"{self.endpoint}: closed")
        if self._reconnecting:
            raise DealerBusy(f"{self.endpoint}: connection lost, reconnecting")
        try:
            send_frames(self._socket, frames)
        except zmq.ZMQError as exc:  # Again: the high-water mark is reached
            raise DealerBusy(f"{self.endpoint}: {exc}") from exc
        if not self._check_due:
            self._check_due = True
            self._loop.call_soon(self._on_readable)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._fd)
        if self._monitor is not None:
            self._loop.remove_reader(self._monitor_fd)
            self._socket.disable_monitor()
            self._monitor.close(linger=0)
        self._socket.close(linger=0)

    def _on_readable(self) -> None:
        self._check_due = False
        sock = self._socket
        while not self._closed and has_message(sock):
            try:
                frames = recv_frames(sock)
            except zmq.Again:
                return
            self._on_message(frames)

    def _on_connection_event(self) -> None:
        monitor = self._monitor
        assert monitor is not None
        while not self._closed and has_message(monitor):
            try:
                event = parse_monitor_message(monitor.recv_multipart(zmq.NOBLOCK))["event"]
            except zmq.Again:
                return
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._up = True
                self._reconnecting = False
            elif event == zmq.EVENT_DISCONNECTED and self._up:
                self._up = False
                # Replies the peer sent before it went answered their requests: taken first.
                self._on_readable()
                if self._closed or self._on_disconnect is None:
                    return
                self._reconnecting = self._refuse_while_reconnecting
                log.info("lost the connection to %s; reconnecting", self.endpoint)
                self._on_disconnect()


class PendingRequests(Generic[ReplyT]):
    """The requests one link sent and waits for: msg_id -> (future, deadline).

    A link takes an id (`next_id`), sends, and registers the request's future (`add`); each
    message received goes through `take` (or, for a header the link already read,
    `take_answered`), which hands back the reply with its request's future, or None for a
    reply the link must drop (counted here). The future is the link's to resolve: `take`
    and expiry only take it out of the table.

    Expiry: one timer for the table, not one per request. Every request waits the same
    `timeout`, so the table (in sending order) is in deadline order: the timer is set for
    the oldest request's deadline, expires what is due when it fires and is set again for
    the oldest left. A request answered in time costs a dict insert and pop, no timer.
    """

    def __init__(
        self,
        adapter: TypeAdapter[ReplyT],
        *,
        peer: str,
        timeout: float,
        on_expire: Callable[[asyncio.Future[Any]], None],
        malformed: MalformedReplies | None = None,
        name: str | None = None,
    ) -> None:
        """
        Args:
            adapter: the boundary's reply union.
            peer: the `peer` label of the link's counts ("pageserver", "mirror", ...).
            timeout: seconds a request waits for its reply.
            on_expire: called once with the future of a request unanswered after `timeout`
                seconds, already out of the table.
            malformed: where dropped replies are counted (None: only logged).
            name: the peer in log lines (default `peer`).
        """
        self._adapter = adapter
        self.peer = peer
        self.name = name or peer
        self.timeout = timeout
        self._on_expire = on_expire
        self._malformed = malformed
        self._loop = asyncio.get_running_loop()
        self._time = self._loop.time
        self._ids = itertools.count(1)
        self._waiting: dict[int, tuple[asyncio.Future[Any], float]] = {}
        self._timer: asyncio.TimerHandle | None = None  # set for the oldest deadline

    def __len__(self) -> int:
        """Requests waiting."""
        return len(self._waiting)

    def next_id(self) -> int:
        """A fresh msg_id."""
        return next(self._ids)

    def add(self, msg_id: int, future: asyncio.Future[Any]) -> None:
        """Wait for the reply to request `msg_id`, just sent, for at most `timeout` seconds."""
        deadline = self._time() + self.timeout
        self._waiting[msg_id] = (future, deadline)
        if self._timer is None:
            self._timer = self._loop.call_at(deadline, self._expire_due)

    def discard(self, msg_id: int) -> None:
        """Stop waiting for `msg_id` (its caller gave up); a reply to it will be late."""
        self._waiting.pop(msg_id, None)

    def take(self, frames: Sequence[Any]) -> tuple[ReplyT, list[Any], asyncio.Future[Any]] | None:
        """Decode a received message: (reply, payload frames, the request's future), its
        request out of the table; None for a message that does not decode or answers no
        request waiting (counted, and dropped)."""
        try:
            reply, payload = decode(frames, self._adapter)
        except ProtocolError as exc:
            log.warning("malformed reply from %s: %s", self.name, exc.detail)
            if self._malformed is not None:
                self._malformed.count(self.peer, exc)
            return None
        future = self.take_answered(reply.parent_id)
        return None if future is None else (reply, payload, future)

    def take_answered(self, parent_id: int) -> asyncio.Future[Any] | None:
        """The future of request `parent_id`, out of the table, for a reply the link decoded
        itself; None if it is not waiting (a late reply: counted, to be dropped)."""
        entry = self._waiting.pop(parent_id, None)
        if entry is None:
            if self._malformed is not None:
                self._malformed.count_late(self.peer)
            return None
        return entry[0]

    def violation(self, exc: ZmtpError) -> None:
        """Count a ZMTP violation of the peer (a dealer's `on_violation`): frames framed
        wrongly, counted with the replies whose frames are wrong."""
        if self._malformed is not None:
            self._malformed.count(
                self.peer, ProtocolError(ErrorCode.MALFORMED, str(exc), reason="bad_frames")
            )

    def fail_all(self, failure: Callable[[], BaseException]) -> None:
        """Fail every request waiting with a fresh `failure()` (one exception per future, so
        tracebacks do not pile up on a shared one) and empty the table."""
        waiting, self._waiting = self._waiting, {}
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for future, _ in waiting.values():
            if not future.done():
                future.set_exception(failure())

    def _expire_due(self) -> None:
        """The timer fired: expire every request whose deadline passed, oldest first, then
        set the timer for the oldest left."""
        self._timer = None
        waiting = self._waiting
        now = self._time()
        while waiting:
            msg_id = next(iter(waiting))
            future, deadline = waiting[msg_id]
            if deadline > now:
                if self._timer is not None:  # set by an add() in on_expire, for a later one
                    self._timer.cancel()
                self._timer = self._loop.call_at(deadline, self._expire_due)
                return
            del waiting[msg_id]
            self._on_expire(future)


class Link(Generic[ReplyT]):
    """One link of the client: a `Dealer` to one peer and the `PendingRequests` of what was
    sent on it (the links differ in their batching and state; this is what they share).

    A subclass names its peer (`peer`, the label of its counts), the boundary's reply union
    (`reply_adapter`) and the messages its dealer may queue (`hwm`, and
    `refuse_while_reconnecting`: see `open_dealer`); it handles each message received
    (`_on_reply`), a request unanswered after `timeout` seconds (`_expired`) and a lost
    connection (`_disconnected`). It opens its dealer with `_open_dealer`: once, or (the
    mirror's) anew after a loss.
    """

    peer: ClassVar[str]
    reply_adapter: ClassVar[TypeAdapter[Any]]
    hwm: ClassVar[int]
    refuse_while_reconnecting: ClassVar[bool] = False

    def __init__(
        self,
        endpoint: str,
        context: zmq.Context[zmq.Socket[bytes]],
        timeout: float,
        malformed: MalformedReplies | None,
        security: Security | None,
        server_key: str | None,
        *,
        name: str,
    ) -> None:
        """`server_key`: the peer's public key, with Curve; `name`: the peer in log lines."""
        self.endpoint = endpoint
        self.timeout = timeout
        self.server_key = server_key
        self._loop = asyncio.get_running_loop()
        self._pending: PendingRequests[ReplyT] = PendingRequests(
            self.reply_adapter,
            peer=self.peer,
            name=name,
            timeout=timeout,
            on_expire=self._expired,
            malformed=malformed,
        )
        self._next_id = self._pending.next_id
        # Connects a dealer to the peer: once, or anew after a loss.
        self._open_dealer: Callable[[], Dealer] = partial(
            open_dealer,
            endpoint,
            self._on_reply,
            context=context,
            security=security,
            server_key=server_key,
            hwm=self.hwm,
            on_violation=self._pending.violation,
            on_disconnect=self._disconnected,
            refuse_while_reconnecting=self.refuse_while_reconnecting,
        )

    def _on_reply(self, frames: list[Any]) -> None:
        """A message from the peer (its frames, not decoded yet: see `PendingRequests.take`)."""
        raise NotImplementedError

    def _expired(self, future: asyncio.Future[Any]) -> None:
        """The request of `future` went unanswered for `timeout` seconds."""
        raise NotImplementedError

    def _disconnected(self) -> None:
        """The connection to the peer is lost: what was sent on it will never be answered."""
        raise NotImplementedError


__all__ = [
    "Dealer",
    "DealerBusy",
    "LibzmqDealer",
    "Link",
    "PendingRequests",
    "ZmtpDealer",
    "open_dealer",
    "speaks_zmtp",
]

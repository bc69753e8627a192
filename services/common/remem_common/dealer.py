"""The socket part shared by remem's blocking clients: one DEALER, its context, request ids,
and send / receive / call with a timeout; and `waiting_replies`, the receive side of a DEALER
that a poll loop drives without blocking."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from typing import Any, ClassVar, Self, TypeVar

import zmq
from pydantic import BaseModel, TypeAdapter

from remem_common.framing import decode, encode
from remem_common.protocol.envelope import ErrorCode, ErrorReply, ProtocolError
from remem_common.security import Security


class BlockingDealer:
    """One DEALER connected to `endpoint`; closed (with its own context) on exit.

    With `security` Curve on, `server_key` is the server's z85 public key (see
    `remem_common.security`); without, the socket is plaintext."""

    # Seconds a call waits for its reply unless the caller says otherwise.
    default_timeout: ClassVar[float] = 10.0

    def __init__(
        self,
        endpoint: str,
        *,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        timeout: float | None = None,
        security: Security | None = None,
        server_key: str | None = None,
    ) -> None:
        self._own_context = context is None
        self.context: zmq.Context[zmq.Socket[bytes]] = context or zmq.Context()
        self.socket: zmq.Socket[bytes] = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        if security is not None:
            try:
                security.client_socket(self.socket, server_key)
            except Exception:
                self.close()
                raise
        self.socket.connect(endpoint)
        self.endpoint = endpoint
        self.timeout = self.default_timeout if timeout is None else timeout
        self._ids = itertools.count(1)

    def next_id(self) -> int:
        """A fresh msg_id for a request."""
        return next(self._ids)

    def close(self) -> None:
        self.socket.close(linger=0)
        if self._own_context:
            self.context.term()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RefusedRequest(Exception):
    """The server answered with an error reply: its code and detail. Each blocking client
    raises its own subclass, so a caller can tell which server refused."""

    def __init__(self, code: ErrorCode, detail: str, parent_id: int = 0) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
        self.parent_id = parent_id  # the msg_id of the request refused


class RequestDealer(BlockingDealer):
    """A BlockingDealer whose replies come one per request: send, receive, call.

    A subclass names its boundary's reply union (`reply_adapter`) and the exceptions a
    timeout and an error reply become (`timeout_type`, `refused_type`; or, to build them
    otherwise, `timeout_error` and `refused`)."""

    reply_adapter: ClassVar[TypeAdapter[Any]]
    timeout_type: ClassVar[type[Exception]] = TimeoutError
    refused_type: ClassVar[type[RefusedRequest]] = RefusedRequest

    def timeout_error(self, detail: str) -> Exception:
        return self.timeout_type(detail)

    def refused(self, reply: ErrorReply) -> Exception:
        return self.refused_type(reply.error_code, reply.detail, reply.parent_id)

    def send(self, msg: BaseModel, *payload: Any) -> None:
        self.socket.send_multipart(encode(msg, *payload), copy=False)

    def receive(
        self, timeout: float | None = None, *, parent_id: int | None = None
    ) -> tuple[Any, list[Any]]:
        """The next reply and its payload frames; raises on error replies and timeouts.

        With `parent_id`, replies to other requests are dropped on the way: the answers to
        earlier calls that timed out, which would otherwise pass for this one's."""
        wait = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        while True:
            left = deadline - time.monotonic()
            # A blocking recv with a timeout, not poll + recv: on these VMs a zmq_poll
            # wake-up adds ~100 us to every round trip.
            self.socket.setsockopt(zmq.RCVTIMEO, max(1, int(left * 1000)))
            try:
                frames = self.socket.recv_multipart()
            except zmq.Again:
                raise self.timeout_error(f"no reply from {self.endpoint} in {wait}s") from None
            reply, payload = decode(frames, self.reply_adapter)
            if parent_id is not None and reply.parent_id != parent_id:
                continue
            if isinstance(reply, ErrorReply):
                raise self.refused(reply)
            return reply, payload

    def call(self, msg: BaseModel, *payload: Any, timeout: float | None = None) -> Any:
        """Send one request and wait for its reply: (reply model, payload frames)."""
        self.send(msg, *payload)
        return self.receive(timeout, parent_id=getattr(msg, "msg_id", None))


ReplyT = TypeVar("ReplyT", bound=BaseModel)


def waiting_replies(
    socket: zmq.Socket[bytes], adapter: TypeAdapter[ReplyT]
) -> Iterator[ReplyT | ProtocolError]:
    """Each reply already waiting on `socket`, decoded with `adapter`, without blocking.

    A malformed reply comes as its `ProtocolError`, so the caller decides whether it ends the
    exchange. Stop iterating before closing the socket: each step receives from it.
    """
    while True:
        try:
            frames = socket.recv_multipart(flags=zmq.NOBLOCK)
        except zmq.Again:
            return
        try:
            reply, _ = decode(frames, adapter)
        except ProtocolError as exc:
            yield exc
            continue
        yield reply

"""Placement's orders to page servers: inventories, slab drops and slab pushes, and their answers.

One DEALER per page server, to its data endpoint. A push is answered only when it is done, so
the replies arrive whenever; they are matched to what was asked by `msg_id`. An order that
fails (refused, unanswered, its link closed) is given back to the cluster state, which may
order drops in turn.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

import zmq
from remem_common.framing import decode, encode
from remem_common.protocol.envelope import (
    MALFORMED_REASONS,
    ErrorReply,
    ProtocolError,
)
from remem_common.protocol.pageserver_placement import (
    SLAB_ORDER_REPLY_ADAPTER,
    DropSlabRequest,
    ListInventoryReply,
    ListInventoryRequest,
    PushSlabReply,
    PushSlabRequest,
    SlabOrderReply,
)
from remem_common.security import (
    KeyFileError,
    Security,
)

from remem_placement.metrics import PlacementMetrics
from remem_placement.policy import Cluster
from remem_placement.records import Drop, Push

log = logging.getLogger("placement")


# A page server that does not answer an inventory or drop in this long has its request
# forgotten (liveness is judged by heartbeats and probes, not by these).
ORDER_TIMEOUT = 10.0
# The push's own inactivity timeout at the source: give up on a silent target after this.
PUSH_IDLE_TIMEOUT = 10.0

Frames = list[Any]


@dataclass
class Link:
    """Placement's DEALER to one page server's data endpoint."""

    server_id: str
    endpoint: str
    socket: zmq.Socket[bytes]


@dataclass(frozen=True)
class Pending:
    kind: Literal["inventory", "drop", "clear", "push"]
    server_id: str
    sent: float
    push_id: int = 0


def frames_bytes(frames: Frames) -> int:
    """Bytes in a message's frames (every byte through placement's sockets is counted)."""
    return sum(memoryview(frame).nbytes for frame in frames)


class PageServerOrders:
    """The links to page servers and the orders sent on them that await an answer.

    Args:
        poller: the loop's poller; each link's socket is registered in it.
        server_keys: server_id -> the Curve public key it registered, kept by the caller.
        push_timeout: how long a push order may take before it is given up.
    """

    def __init__(
        self,
        cluster: Cluster,
        metrics: PlacementMetrics,
        context: zmq.Context[zmq.Socket[bytes]],
        poller: zmq.Poller,
        security: Security,
        server_keys: dict[str, str],
        *,
        push_timeout: float,
    ) -> None:
        self.cluster = cluster
        self.metrics = metrics
        self.context = context
        self.poller = poller
        self.security = security
        self.server_keys = server_keys
        self.push_timeout = push_timeout
        self.links: dict[str, Link] = {}
        self._link_of_socket: dict[zmq.Socket[bytes], Link] = {}
        self.pending: dict[int, Pending] = {}
        self._msg_id = 0
        self._closed = False

    def close(self) -> None:
        """Close every link; no order opens a new one after this."""
        # Closing a link fails its pending pushes, and a failed push orders drops: with
        # _closed set no order opens a new link, so every socket is closed before the
        # context terminates (an unclosed one makes context.term() block forever).
        self._closed = True
        while self.links:
            self.close_link(next(iter(self.links)))

    def on_readable(self, sock: zmq.Socket[bytes]) -> None:
        """Take the replies waiting on `sock`, if it is a link's socket."""
        link = self._link_of_socket.get(sock)
        if link is not None:
            self._on_link_readable(link)

    def ask_inventory(self, server_id: str) -> None:
        """Ask a page server which slabs it holds (its answer is adopted by the cluster)."""
        self.send_order(server_id, ListInventoryRequest(msg_id=self._next_id()), "inventory")

    def _next_id(self) -> int:
        self._msg_id += 1
        return self._msg_id

    def _link(self, server_id: str) -> Link | None:
        link = self.links.get(server_id)
        if link is not None or self._closed:
            return link
        server = self.cluster.servers.get(server_id)
        if server is None or server.liveness == "dead":
            return None
        sock: zmq.Socket[bytes] = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            self.security.client_socket(sock, self.server_keys.get(server_id))
        except KeyFileError:
            sock.close(linger=0)
            log.warning("no public key registered by server_id=%s: cannot reach it", server_id)
            return None
        try:
            sock.connect(server.endpoint)
        except zmq.ZMQError as exc:
            # The protocol refuses endpoints libzmq cannot parse; should one slip through,
            # this server gets no orders, and placement neither stops nor leaks the socket.
            sock.close(linger=0)
            log.warning(
                "cannot connect server_id=%s endpoint=%s: %s", server_id, server.endpoint, exc
            )
            return None
        link = Link(server_id, server.endpoint, sock)
        self.links[server_id] = link
        self._link_of_socket[sock] = link
        self.poller.register(sock, zmq.POLLIN)
        return link

    def close_link(self, server_id: str) -> None:
        """Close a page server's link; the orders awaiting its answers fail."""
        link = self.links.pop(server_id, None)
        if link is None:
            return
        self._link_of_socket.pop(link.socket, None)
        self.poller.unregister(link.socket)
        link.socket.close(linger=0)
        for msg_id, pending in list(self.pending.items()):
            if pending.server_id == server_id:
                del self.pending[msg_id]
                if pending.kind == "push":
                    self._push_failed(pending.push_id, "the source's link closed")
                elif pending.kind == "clear":
                    self._clear_failed(pending.push_id, "the target's link closed")

    def send_order(
        self,
        server_id: str,
        msg: ListInventoryRequest | DropSlabRequest | PushSlabRequest,
        kind: Literal["inventory", "drop", "clear", "push"],
        push_id: int = 0,
    ) -> bool:
        """Send an order to a page server (opening its link); False if it could not go."""
        link = self._link(server_id)
        if link is None:
            return False
        frames = encode(msg)
        try:
            link.socket.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:
            log.warning("could not queue %s to server_id=%s", msg.type, server_id)
            return False
        self.metrics.bytes_out.inc(frames_bytes(frames))
        self.pending[msg.msg_id] = Pending(kind, server_id, time.monotonic(), push_id)
        return True

    def send_drops(self, drops: list[Drop]) -> None:
        """Order each drop (or clear before a push) from the page server named in it."""
        for drop in drops:
            tenant, volume, slab = drop.key
            log.info(
                "ordering %s server_id=%s tenant=%s volume=%d slab=%d",
                "clear before a push" if drop.push_id else "drop",
                drop.server_id,
                tenant,
                volume,
                slab,
            )
            sent = self.send_order(
                drop.server_id,
                DropSlabRequest(msg_id=self._next_id(), tenant=tenant, volume=volume, slab=slab),
                "clear" if drop.push_id else "drop",
                drop.push_id,
            )
            if drop.push_id and not sent:
                self._clear_failed(drop.push_id, "could not send the order")

    def _clear_failed(self, push_id: int, why: str) -> None:
        push = self.cluster.pushes.get(push_id)
        if push is not None:
            log.warning("push target %s could not clear slab %s: %s", push.target, push.key, why)
        self.send_drops(self.cluster.cleared(push_id, ok=False, now=time.monotonic()))

    def send_push(self, push: Push) -> None:
        """Order the push's source to copy the slab to its target."""
        tenant, volume, slab = push.key
        target = self.cluster.servers[push.target]
        log.info(
            "ordering push reason=%s tenant=%s volume=%d slab=%d from=%s to=%s",
            push.reason,
            tenant,
            volume,
            slab,
            push.source,
            push.target,
        )
        sent = self.send_order(
            push.source,
            PushSlabRequest(
                msg_id=self._next_id(),
                tenant=tenant,
                volume=volume,
                slab=slab,
                target_endpoint=target.endpoint,
                target_public_key=self.server_keys.get(push.target),
                timeout=min(PUSH_IDLE_TIMEOUT, self.push_timeout),
            ),
            "push",
            push.push_id,
        )
        if not sent:
            self._push_failed(push.push_id, "could not send the order")

    def _push_failed(self, push_id: int, why: str) -> None:
        push = self.cluster.pushes.get(push_id)
        if push is None:
            return
        log.warning(
            "push failed slab=%s from=%s to=%s: %s", push.key, push.source, push.target, why
        )
        self.metrics.push_failed.inc()
        self.send_drops(self.cluster.push_finished(push_id, ok=False, now=time.monotonic()))

    def _on_link_readable(self, link: Link) -> None:
        while link.server_id in self.links:
            try:
                frames = link.socket.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            self.metrics.bytes_in.inc(frames_bytes(frames))
            try:
                reply, _ = decode(frames, SLAB_ORDER_REPLY_ADAPTER)
            except ProtocolError as exc:
                log.warning("server_id=%s sent a malformed reply: %s", link.server_id, exc.detail)
                if exc.reason in MALFORMED_REASONS:
                    self.metrics.malformed_by[exc.reason].inc()
                continue
            # Any answer on its data endpoint shows the server is reachable: clears a probe.
            self.cluster.probe_answered(link.server_id, time.monotonic())
            pending = self.pending.pop(reply.parent_id, None)
            if pending is None:
                continue
            self._on_order_reply(pending, reply)

    def _on_order_reply(self, pending: Pending, reply: SlabOrderReply) -> None:
        now = time.monotonic()
        if pending.kind == "push":
            push = self.cluster.pushes.get(pending.push_id)
            if isinstance(reply, PushSlabReply) and push is not None:
                self.metrics.push_ok.inc()
                self.metrics.rereplication_bytes.inc(reply.bytes)
                self.metrics.rereplication_duration.observe(now - pending.sent)
                log.info(
                    "push done tenant=%s volume=%d slab=%d to=%s pages=%d seconds=%.3f",
                    *push.key,
                    push.target,
                    reply.pages,
                    reply.seconds,
                )
                drops = self.cluster.push_finished(
                    pending.push_id, ok=True, copied_bytes=reply.bytes, now=now
                )
                self.send_drops(drops)
            elif isinstance(reply, ErrorReply):
                self._push_failed(pending.push_id, f"{reply.error_code}: {reply.detail}")
        elif pending.kind == "clear":
            if isinstance(reply, ErrorReply):
                self._clear_failed(pending.push_id, f"{reply.error_code}: {reply.detail}")
            else:
                self.send_drops(self.cluster.cleared(pending.push_id, ok=True, now=now))
        elif isinstance(reply, ListInventoryReply):
            drops = self.cluster.adopt_inventory(
                pending.server_id,
                [(s.tenant, s.volume, s.slab) for s in reply.slabs],
                now,
            )
            self.send_drops(drops)
        elif isinstance(reply, ErrorReply):
            log.warning(
                "server_id=%s refused %s: %s %s",
                pending.server_id,
                pending.kind,
                reply.error_code,
                reply.detail,
            )

    def expire(self, now: float) -> None:
        """Forget orders unanswered for too long; a forgotten push or clear has failed."""
        for msg_id, pending in list(self.pending.items()):
            limit = self.push_timeout if pending.kind == "push" else ORDER_TIMEOUT
            if now - pending.sent > limit:
                del self.pending[msg_id]
                if pending.kind == "push":
                    self._push_failed(pending.push_id, f"no answer in {limit}s")
                elif pending.kind == "clear":
                    self._clear_failed(pending.push_id, f"no answer in {limit}s")

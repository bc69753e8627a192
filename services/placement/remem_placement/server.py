"""Placement's ZeroMQ loop: one thread owns the cluster state and every socket.

- ROUTER (`--listen`): page servers' registrations and heartbeats, clients' allocations, map
  polls and failure reports, admin status and drain requests.
- One DEALER per page server, to its data endpoint: inventory requests, slab drops and slab
  push orders. A push is answered only when it is done, so these replies arrive whenever;
  they are matched to what was asked by `msg_id`.
- Optional PUB (`--publish`): a notice per volume whose map changed.
- Timers between polls: liveness, utilization samples (HTTP in a thread pool, collected
  here), repair planning, push timeouts.

`start` assembles the service from its config for `remem_common.lifecycle.run_service`.

Placement never sends or receives page data: no message here has payload frames, and every
byte through its sockets is counted in `placement_message_bytes_total`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import zmq
from prometheus_client import REGISTRY
from pydantic import BaseModel, Field, TypeAdapter
from remem_common.config import bind_address
from remem_common.framing import decode, encode, split_routing
from remem_common.lifecycle import Lifecycle, Servable, Started
from remem_common.protocol.admin_placement import (
    DrainServerReply,
    DrainServerRequest,
    GetStatusReply,
    GetStatusRequest,
    PushStatus,
    ServerStatus,
    SlabStatus,
)
from remem_common.protocol.client_placement import (
    AllocateSlabReply,
    AllocateSlabRequest,
    GetMapReply,
    GetMapRequest,
    MapChangedNotice,
    ReplicaRef,
    ReportFailureReply,
    ReportFailureRequest,
    map_topic,
)
from remem_common.protocol.envelope import (
    MALFORMED_REASONS,
    ErrorCode,
    ErrorReply,
    ProtocolError,
)
from remem_common.protocol.pageserver_placement import (
    DropSlabReply,
    DropSlabRequest,
    HeartbeatReply,
    HeartbeatRequest,
    ListInventoryReply,
    ListInventoryRequest,
    PushSlabReply,
    PushSlabRequest,
    RegisterServerReply,
    RegisterServerRequest,
)
from remem_common.security import (
    Identity,
    KeyFileError,
    Role,
    Security,
    permits,
)

from remem_placement.config import PlacementConfig
from remem_placement.metrics import PlacementMetrics, StateGauges
from remem_placement.policy import (
    Cluster,
    Drop,
    NoEligibleServer,
    Push,
    Rebuilding,
    SlabKey,
)
from remem_placement.utilization import Target, UtilizationPoller

log = logging.getLogger("placement")

ServedRequest = Annotated[
    RegisterServerRequest
    | HeartbeatRequest
    | AllocateSlabRequest
    | GetMapRequest
    | ReportFailureRequest
    | GetStatusRequest
    | DrainServerRequest,
    Field(discriminator="type"),
]
SERVED_ADAPTER: TypeAdapter[ServedRequest] = TypeAdapter(ServedRequest)
LinkReply = Annotated[
    ListInventoryReply | DropSlabReply | PushSlabReply | ErrorReply, Field(discriminator="type")
]
LINK_REPLY_ADAPTER: TypeAdapter[LinkReply] = TypeAdapter(LinkReply)

OP_OF = {
    "register_server_request": "register",
    "heartbeat_request": "heartbeat",
    "allocate_slab_request": "allocate",
    "get_map_request": "get_map",
    "report_failure_request": "report_failure",
    "get_status_request": "status",
    "drain_server_request": "drain",
}
POLL_MS = 50
# Who may send what (with Curve): page servers register and heartbeat, clients ask about
# their own tenant's volumes, admins see everything. Without Curve everyone may do anything.
ROLES_OF: dict[str, tuple[Role, ...]] = {
    "register_server_request": ("pageserver",),
    "heartbeat_request": ("pageserver",),
    "allocate_slab_request": ("client",),
    "get_map_request": ("client",),
    "report_failure_request": ("client",),
    "get_status_request": ("admin",),
    "drain_server_request": ("admin",),
}
ADMITTED_ROLES: tuple[Role, ...] = ("pageserver", "client", "admin")
PLAN_INTERVAL = 0.05
MAX_BURST = 256
# A page server that does not answer an inventory or drop in this long has its request
# forgotten (liveness is judged by heartbeats and probes, not by these).
ORDER_TIMEOUT = 10.0
# The push's own inactivity timeout at the source: give up on a silent target after this.
PUSH_IDLE_TIMEOUT = 10.0

Frames = list[Any]


def _frames_bytes(frames: Frames) -> int:
    return sum(memoryview(frame).nbytes for frame in frames)


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


class PlacementServer:
    """Serves the control plane until asked to stop."""

    def __init__(
        self,
        config: PlacementConfig,
        cluster: Cluster,
        metrics: PlacementMetrics,
        context: zmq.Context[zmq.Socket[bytes]],
        utilization: UtilizationPoller,
        security: Security | None = None,
    ) -> None:
        self.config = config
        self.security = security or Security.insecure()
        # server_id -> the Curve public key it registered (its data endpoint's key).
        self.server_keys: dict[str, str] = {}
        self.cluster = cluster
        self.metrics = metrics
        self.context = context
        self.utilization = utilization
        self.router: zmq.Socket[bytes] = context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.security.server_socket(self.router)
        self.publisher: zmq.Socket[bytes] | None = None
        self.poller = zmq.Poller()
        self.poller.register(self.router, zmq.POLLIN)
        self.links: dict[str, Link] = {}
        self._link_of_socket: dict[zmq.Socket[bytes], Link] = {}
        self.pending: dict[int, Pending] = {}
        self._msg_id = 0
        self._stopping = False
        self._closed = False
        self._next_plan = 0.0
        self._handlers: dict[str, Callable[[Any], BaseModel]] = {
            "register_server_request": self._register,
            "heartbeat_request": self._heartbeat,
            "allocate_slab_request": self._allocate,
            "get_map_request": self._get_map,
            "report_failure_request": self._report_failure,
            "get_status_request": self._status,
            "drain_server_request": self._drain,
        }

    # -- lifecycle -------------------------------------------------------------------------

    def bind(self, endpoint: str) -> str:
        """Bind the ROUTER; returns the endpoint bound (with the chosen port)."""
        return _bind(self.router, endpoint)

    def bind_publish(self, endpoint: str) -> str:
        self.publisher = self.context.socket(zmq.PUB)
        self.publisher.setsockopt(zmq.LINGER, 0)
        self.security.server_socket(self.publisher)
        return _bind(self.publisher, endpoint)

    def request_stop(self) -> None:
        """Ask the loop to finish (safe from a signal handler)."""
        self._stopping = True

    def serve_forever(self) -> None:
        """Serve until `request_stop`; nothing to drain (`close` ends the links)."""
        while not self._stopping:
            self.serve_once(POLL_MS)

    def close(self) -> None:
        # Closing a link fails its pending pushes, and a failed push orders drops: with
        # _closed set no order opens a new link, so every socket is closed before the
        # context terminates (an unclosed one makes context.term() block forever).
        self._closed = True
        while self.links:
            self._close_link(next(iter(self.links)))
        if self.publisher is not None:
            self.publisher.close(linger=0)
        self.router.close(linger=0)
        self.utilization.close()

    def serve_once(self, timeout_ms: int) -> None:
        events = dict(self.poller.poll(timeout_ms))
        if self.router in events:
            self._drain_router()
        for sock in events:
            link = self._link_of_socket.get(sock)
            if link is not None:
                self._on_link_readable(link)
        now = time.monotonic()
        wall = time.time()
        dead, drops = self.cluster.tick(now)
        for server_id in dead:
            log.warning("page server dead server_id=%s", server_id)
            self._close_link(server_id)
        self._send_drops(drops)
        self._utilization(now)
        self._expire_pending(now)
        if now >= self._next_plan:
            # Planning walks every slab: at most every PLAN_INTERVAL, not per message.
            self._next_plan = now + PLAN_INTERVAL
            pushes, drops = self.cluster.plan(now, wall)
            if not self.cluster.in_grace(now):
                self.metrics.planning_rounds.inc()
            self._send_drops(drops)
            for push in pushes:
                self._send_push(push)
        self._publish()

    # -- the ROUTER --------------------------------------------------------------------------

    def _drain_router(self) -> None:
        for _ in range(MAX_BURST):
            try:
                # copy=False: each Frame carries its sender's User-Id (Curve identity).
                frames = self.router.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self.metrics.bytes_in.inc(_frames_bytes(frames))
            self._handle(frames)

    def _handle(self, frames: Frames) -> None:
        routing = frames[:1]
        op: str | None = None
        msg_id = 0
        reply: BaseModel
        try:
            routing, body = split_routing(frames)
            msg, payload = decode(body, SERVED_ADAPTER)
            msg_id = msg.msg_id
            if payload:
                raise ProtocolError(
                    ErrorCode.MALFORMED,
                    f"{msg.type} takes no payload frames, got {len(payload)}",
                    reason="bad_frames",
                    msg_id=msg_id,
                )
            op = OP_OF[msg.type]
            identity = self.security.identity(frames[0])
            self._authorize(identity, msg)
            reply = self._handlers[msg.type](msg)
        except ProtocolError as exc:
            if exc.reason in MALFORMED_REASONS:
                self.metrics.malformed_by[exc.reason].inc()
            reply = ErrorReply(
                msg_id=0, parent_id=exc.msg_id or msg_id, error_code=exc.code, detail=exc.detail
            )
        except Exception:
            # One bad request must never take the control plane down.
            log.exception("internal error handling %s", op)
            reply = ErrorReply(
                msg_id=0,
                parent_id=msg_id,
                error_code=ErrorCode.INTERNAL,
                detail="internal error; see placement's log",
            )
        if op is not None:
            (self.metrics.error if isinstance(reply, ErrorReply) else self.metrics.ok)[op].inc()
        out = [*routing, *encode(reply)]
        self.metrics.bytes_out.inc(_frames_bytes(out))
        try:
            self.router.send_multipart(out, flags=zmq.NOBLOCK)
        except zmq.Again:
            log.warning("dropped a reply: the peer is not reading")

    def _authorize(self, identity: Identity | None, msg: Any) -> None:
        """Raise `forbidden` unless the sender's key may make this request (and count it)."""
        tenant = getattr(msg, "tenant", None)
        allowed = permits(identity, ROLES_OF[msg.type], tenant)
        what = f"{OP_OF[msg.type]} for tenant {tenant}" if tenant else OP_OF[msg.type]
        if (
            allowed
            and identity is not None
            and isinstance(msg, RegisterServerRequest)
            and msg.public_key != identity.public_key
        ):
            # A page server announces the key of its data endpoint, which is the key it
            # authenticates with: no page server can make clients trust another key.
            allowed = False
            what = "register a public key other than its own"
        if allowed:
            return
        raise self.metrics.auth.forbid(identity, what, msg.msg_id)

    @staticmethod
    def _error(msg_id: int, code: ErrorCode, detail: str) -> ErrorReply:
        return ErrorReply(msg_id=0, parent_id=msg_id, error_code=code, detail=detail)

    # -- page servers ------------------------------------------------------------------------

    def _register(self, msg: RegisterServerRequest) -> BaseModel:
        known = self.cluster.servers.get(msg.server_id)
        if known is None or known.liveness == "dead" or known.endpoint != msg.data_endpoint:
            log.info(
                "page server registered server_id=%s endpoint=%s zone=%s capacity=%d",
                msg.server_id,
                msg.data_endpoint,
                msg.zone,
                msg.capacity_bytes,
            )
        self.cluster.register(
            msg.server_id,
            endpoint=msg.data_endpoint,
            metrics_url=msg.metrics_url,
            zone=msg.zone,
            capacity_bytes=msg.capacity_bytes,
            used_bytes=msg.used_bytes,
            started_at=msg.started_at,
            now=time.monotonic(),
            wall=time.time(),
        )
        link = self.links.get(msg.server_id)
        if link is not None and (
            link.endpoint != msg.data_endpoint
            or self.server_keys.get(msg.server_id) != msg.public_key
        ):
            self._close_link(msg.server_id)
        if msg.public_key is not None:
            self.server_keys[msg.server_id] = msg.public_key
        self._send_order(msg.server_id, ListInventoryRequest(msg_id=self._next_id()), "inventory")
        self.utilization.soon()
        return RegisterServerReply(
            msg_id=0, parent_id=msg.msg_id, heartbeat_interval=self.config.heartbeat_interval
        )

    def _heartbeat(self, msg: HeartbeatRequest) -> BaseModel:
        server = self.cluster.servers.get(msg.server_id)
        was_pressured = server is not None and server.under_pressure
        known = self.cluster.heartbeat(
            msg.server_id,
            used_bytes=msg.used_bytes,
            capacity_bytes=msg.capacity_bytes,
            under_pressure=msg.under_pressure,
            now=time.monotonic(),
        )
        if known and msg.under_pressure != was_pressured:
            log.warning(
                "page server %s memory pressure server_id=%s",
                "under" if msg.under_pressure else "out of",
                msg.server_id,
            )
        return HeartbeatReply(msg_id=0, parent_id=msg.msg_id, registered=known)

    # -- clients ---------------------------------------------------------------------------

    def _refs(self, server_ids: list[str]) -> list[ReplicaRef]:
        return [
            ReplicaRef(
                server_id=sid,
                endpoint=self.cluster.servers[sid].endpoint,
                public_key=self.server_keys.get(sid),
            )
            for sid in server_ids
        ]

    def _allocate(self, msg: AllocateSlabRequest) -> BaseModel:
        started = time.perf_counter()
        key: SlabKey = (msg.tenant, msg.volume, msg.slab)
        try:
            allocation = self.cluster.allocate(
                key,
                msg.replicas,
                known=msg.known_replicas,
                now=time.monotonic(),
                wall=time.time(),
            )
        except Rebuilding as exc:
            return self._error(msg.msg_id, ErrorCode.UNAVAILABLE, str(exc))
        except NoEligibleServer as exc:
            return self._error(msg.msg_id, ErrorCode.NO_SPACE, str(exc))
        finally:
            self.metrics.allocation_duration.observe(time.perf_counter() - started)
        if not allocation.replicas and not allocation.filling:
            # Every copy died. Placing it afresh would hand out empty pages as if they were
            # the slab's: the client must learn the data is gone.
            return self._error(
                msg.msg_id,
                ErrorCode.UNAVAILABLE,
                f"slab {msg.tenant}/{msg.volume}/{msg.slab} is lost: every replica died",
            )
        return AllocateSlabReply(
            msg_id=0,
            parent_id=msg.msg_id,
            tenant=msg.tenant,
            volume=msg.volume,
            slab=msg.slab,
            replicas=self._refs(allocation.replicas),
            filling=self._refs(allocation.filling),
            degraded=allocation.degraded,
            epoch=allocation.epoch,
        )

    def _get_map(self, msg: GetMapRequest) -> BaseModel:
        cluster = self.cluster
        cluster.map_applied(msg.tenant, msg.volume, msg.since_epoch)
        changed = cluster.volume_epoch.get((msg.tenant, msg.volume), 0) > msg.since_epoch
        reply = GetMapReply(
            msg_id=0,
            parent_id=msg.msg_id,
            tenant=msg.tenant,
            volume=msg.volume,
            epoch=cluster.epoch,
            changed=changed,
        )
        if not changed:
            return reply
        slabs = cluster.volume_map(msg.tenant, msg.volume)
        used = {sid for slab in slabs.values() for sid in slab.replicas + slab.filling}
        return reply.model_copy(
            update={
                "servers": {sid: cluster.servers[sid].endpoint for sid in sorted(used)},
                "server_keys": {
                    sid: self.server_keys[sid] for sid in sorted(used) if sid in self.server_keys
                },
                "slabs": [
                    (number, list(slab.replicas), list(slab.filling))
                    for number, slab in slabs.items()
                ],
                "degraded": [
                    number for number, slab in slabs.items() if len(slab.replicas) < slab.target
                ],
            }
        )

    def _report_failure(self, msg: ReportFailureRequest) -> BaseModel:
        server = self.cluster.servers.get(msg.server_id)
        if server is None:
            return self._error(msg.msg_id, ErrorCode.NOT_FOUND, f"no server {msg.server_id!r}")
        probing = server.probe_deadline is not None
        now = time.monotonic()
        if msg.missed_write:
            drops = self.cluster.missed_write(
                msg.server_id, (msg.tenant, msg.volume, msg.slab), now
            )
            if drops:
                log.warning(
                    "replica missed a write: dropping it from the slab server_id=%s tenant=%s "
                    "volume=%d slab=%d",
                    msg.server_id,
                    msg.tenant,
                    msg.volume,
                    msg.slab,
                )
            self._send_drops(drops)
        state = self.cluster.report_failure(msg.server_id, now)
        if state != "dead" and not probing:
            log.warning(
                "client reported a failing replica server_id=%s tenant=%s volume=%d slab=%d: %s",
                msg.server_id,
                msg.tenant,
                msg.volume,
                msg.slab,
                msg.detail,
            )
            self._send_order(
                msg.server_id, ListInventoryRequest(msg_id=self._next_id()), "inventory"
            )
        return ReportFailureReply(
            msg_id=0, parent_id=msg.msg_id, server_state=state, epoch=self.cluster.epoch
        )

    # -- admin -----------------------------------------------------------------------------

    def _status(self, msg: GetStatusRequest) -> BaseModel:
        cluster = self.cluster
        now = time.monotonic()
        reserve = cluster.settings.alloc_reserve
        servers = [
            ServerStatus(
                server_id=s.server_id,
                zone=s.zone,
                state=s.state,
                endpoint=s.endpoint,
                used_bytes=max(0, s.capacity_bytes - max(0, s.free_estimate(reserve))),
                capacity_bytes=s.capacity_bytes,
                slabs=len(cluster.held_by(s.server_id)),
                under_pressure=s.under_pressure,
                draining=s.draining,
                utilization_from="metrics" if s.from_metrics else "register",
            )
            for s in sorted(cluster.servers.values(), key=lambda s: s.server_id)
        ]
        degraded = [
            SlabStatus(
                tenant=key[0],
                volume=key[1],
                slab=key[2],
                target=slab.target,
                replicas=list(slab.replicas),
                filling=list(slab.filling),
            )
            for key, slab in sorted(cluster.slabs.items())
            if len(slab.replicas) < slab.target
        ]
        pushes = [
            PushStatus(
                tenant=p.key[0],
                volume=p.key[1],
                slab=p.key[2],
                source=p.source,
                target=p.target,
                reason=p.reason,
                seconds=max(0.0, now - p.started),
                copying=p.push_id not in cluster.waiting and p.push_id not in cluster.clearing,
            )
            for p in cluster.pushes.values()
        ]
        return GetStatusReply(
            msg_id=0,
            parent_id=msg.msg_id,
            epoch=cluster.epoch,
            in_grace=cluster.in_grace(now),
            slabs_total=len(cluster.slabs),
            servers=servers,
            degraded=degraded,
            pushes=pushes,
            pushes_done=cluster.pushes_done,
            pushes_failed=cluster.pushes_failed,
            rereplicated_bytes=cluster.rereplicated_bytes,
        )

    def _drain(self, msg: DrainServerRequest) -> BaseModel:
        try:
            left = self.cluster.drain(msg.server_id, cancel=msg.cancel)
        except KeyError:
            return self._error(msg.msg_id, ErrorCode.NOT_FOUND, f"no server {msg.server_id!r}")
        log.info(
            "%s server_id=%s slabs=%d",
            "drain cancelled" if msg.cancel else "draining",
            msg.server_id,
            left,
        )
        return DrainServerReply(
            msg_id=0,
            parent_id=msg.msg_id,
            server_id=msg.server_id,
            draining=not msg.cancel,
            slabs_left=left,
        )

    # -- orders to page servers --------------------------------------------------------------

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

    def _close_link(self, server_id: str) -> None:
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

    def _send_order(
        self,
        server_id: str,
        msg: ListInventoryRequest | DropSlabRequest | PushSlabRequest,
        kind: Literal["inventory", "drop", "clear", "push"],
        push_id: int = 0,
    ) -> bool:
        link = self._link(server_id)
        if link is None:
            return False
        frames = encode(msg)
        try:
            link.socket.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:
            log.warning("could not queue %s to server_id=%s", msg.type, server_id)
            return False
        self.metrics.bytes_out.inc(_frames_bytes(frames))
        self.pending[msg.msg_id] = Pending(kind, server_id, time.monotonic(), push_id)
        return True

    def _send_drops(self, drops: list[Drop]) -> None:
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
            sent = self._send_order(
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
        self._send_drops(self.cluster.cleared(push_id, ok=False, now=time.monotonic()))

    def _send_push(self, push: Push) -> None:
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
        sent = self._send_order(
            push.source,
            PushSlabRequest(
                msg_id=self._next_id(),
                tenant=tenant,
                volume=volume,
                slab=slab,
                target_endpoint=target.endpoint,
                target_public_key=self.server_keys.get(push.target),
                timeout=min(PUSH_IDLE_TIMEOUT, self.config.push_timeout),
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
        self._send_drops(self.cluster.push_finished(push_id, ok=False, now=time.monotonic()))

    def _on_link_readable(self, link: Link) -> None:
        while link.server_id in self.links:
            try:
                frames = link.socket.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            self.metrics.bytes_in.inc(_frames_bytes(frames))
            try:
                reply, _ = decode(frames, LINK_REPLY_ADAPTER)
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

    def _on_order_reply(self, pending: Pending, reply: LinkReply) -> None:
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
                self._send_drops(drops)
            elif isinstance(reply, ErrorReply):
                self._push_failed(pending.push_id, f"{reply.error_code}: {reply.detail}")
        elif pending.kind == "clear":
            if isinstance(reply, ErrorReply):
                self._clear_failed(pending.push_id, f"{reply.error_code}: {reply.detail}")
            else:
                self._send_drops(self.cluster.cleared(pending.push_id, ok=True, now=now))
        elif isinstance(reply, ListInventoryReply):
            drops = self.cluster.adopt_inventory(
                pending.server_id,
                [(s.tenant, s.volume, s.slab) for s in reply.slabs],
                now,
            )
            self._send_drops(drops)
        elif isinstance(reply, ErrorReply):
            log.warning(
                "server_id=%s refused %s: %s %s",
                pending.server_id,
                pending.kind,
                reply.error_code,
                reply.detail,
            )

    def _expire_pending(self, now: float) -> None:
        for msg_id, pending in list(self.pending.items()):
            limit = self.config.push_timeout if pending.kind == "push" else ORDER_TIMEOUT
            if now - pending.sent > limit:
                del self.pending[msg_id]
                if pending.kind == "push":
                    self._push_failed(pending.push_id, f"no answer in {limit}s")
                elif pending.kind == "clear":
                    self._clear_failed(pending.push_id, f"no answer in {limit}s")

    # -- utilization and notices -------------------------------------------------------------

    def _utilization(self, now: float) -> None:
        samples, errors = self.utilization.collect()
        for sample in samples:
            self.cluster.set_utilization(
                sample.server_id, sample.used_bytes, sample.capacity_bytes, sample.at
            )
        for error in errors:
            self.metrics.utilization_errors.inc()
            log.debug("utilization sample failed: %s", error)
        if self.utilization.due(now):
            targets = [
                Target(s.server_id, s.metrics_url)
                for s in self.cluster.servers.values()
                if s.liveness != "dead"
            ]
            self.utilization.start(targets, now)

    def _publish(self) -> None:
        changed = self.cluster.changed
        if not changed:
            return
        self.cluster.changed = set()
        if self.publisher is None:
            return
        for tenant, volume in sorted(changed):
            notice = MapChangedNotice(
                tenant=tenant, volume=volume, epoch=self.cluster.volume_epoch[(tenant, volume)]
            )
            with contextlib.suppress(zmq.Again):
                self.publisher.send_multipart(
                    [map_topic(tenant, volume), notice.model_dump_json().encode()],
                    flags=zmq.NOBLOCK,
                )


def start(config: PlacementConfig, lifecycle: Lifecycle) -> Started[Servable]:
    """Build the cluster state, bind: placement, ready to serve."""
    security = Security.from_settings(config, "placement")
    # Epochs only need to grow, also across restarts of placement: start from the clock in
    # microseconds, far above anything a previous run could have counted up to.
    cluster = Cluster(config.policy(), started=time.monotonic(), epoch_start=time.time_ns() // 1000)
    metrics = PlacementMetrics(REGISTRY)
    metrics.watch(
        StateGauges(
            servers=lambda: _count_states(cluster),
            slabs=cluster.slab_states,
            epoch=lambda: cluster.epoch,
        )
    )
    context = lifecycle.zmq_context()
    lifecycle.serve_security(security, context, ADMITTED_ROLES, metrics.auth)
    utilization = UtilizationPoller(
        config.utilization_source,
        interval=config.scrape_interval,
        timeout=config.scrape_timeout,
        prometheus_url=config.prometheus_url,
    )
    server = PlacementServer(config, cluster, metrics, context, utilization, security)
    lifecycle.callback(server.close)
    with lifecycle.as_failure("cannot bind", zmq.ZMQError):
        endpoint = server.bind(config.listen)
        publish = server.bind_publish(config.publish) if config.publish else None
    ready: dict[str, object] = {
        "endpoint": endpoint,
        "metrics": lifecycle.metrics_endpoint(config.metrics_port, config.metrics_host),
    }
    if publish:
        ready["publish"] = publish
    ready |= {
        "source": config.utilization_source,
        "grace": f"{config.restart_grace:.1f}s",
        "curve": security.enabled,
    }
    return Started(server, ready)


def _count_states(cluster: Cluster) -> dict[str, int]:
    counts: dict[str, int] = {}
    for server in cluster.servers.values():
        counts[server.state] = counts.get(server.state, 0) + 1
    return counts


def _bind(sock: zmq.Socket[bytes], endpoint: str) -> str:
    sock.bind(bind_address(endpoint))
    bound = sock.getsockopt(zmq.LAST_ENDPOINT)
    assert isinstance(bound, bytes)
    return bound.decode()

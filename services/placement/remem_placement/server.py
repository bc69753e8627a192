"""Placement's ZeroMQ loop: one thread owns the cluster state and every socket.

- ROUTER (`--listen`): page servers' registrations and heartbeats, clients' allocations, map
  polls and failure reports (here), admin status and drain requests (remem_placement.admin).
- One DEALER per page server, to its data endpoint: inventory requests, slab drops and slab
  push orders (remem_placement.orders).
- Optional PUB (`--publish`): a notice per volume whose map changed.
- Timers between polls: liveness, utilization samples (HTTP in a thread pool, collected
  here), repair planning, order timeouts.

Placement never sends or receives page data: no message here has payload frames, and every
byte through its sockets is counted in `placement_message_bytes_total`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Annotated, Any

import zmq
from pydantic import BaseModel, Field, TypeAdapter
from remem_common.config import bind_address
from remem_common.framing import decode, encode, split_routing
from remem_common.protocol.admin_placement import (
    DrainServerRequest,
    GetStatusRequest,
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
    HeartbeatReply,
    HeartbeatRequest,
    RegisterServerReply,
    RegisterServerRequest,
)
from remem_common.security import (
    Identity,
    Role,
    Security,
    permits,
)

from remem_placement import admin
from remem_placement.config import PlacementConfig
from remem_placement.metrics import PlacementMetrics
from remem_placement.orders import Frames, PageServerOrders, frames_bytes
from remem_placement.policy import Cluster
from remem_placement.records import NoEligibleServer, Rebuilding, SlabKey
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


PLAN_INTERVAL = 0.05
MAX_BURST = 256


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
        self.orders = PageServerOrders(
            cluster,
            metrics,
            context,
            self.poller,
            self.security,
            self.server_keys,
            push_timeout=config.push_timeout,
        )
        self._stopping = False
        self._next_plan = 0.0
        self._handlers: dict[str, Callable[[Any], BaseModel]] = {
            "register_server_request": self._register,
            "heartbeat_request": self._heartbeat,
            "allocate_slab_request": self._allocate,
            "get_map_request": self._get_map,
            "report_failure_request": self._report_failure,
            "get_status_request": partial(admin.status_reply, cluster),
            "drain_server_request": partial(admin.drain_reply, cluster),
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
        self.orders.close()
        if self.publisher is not None:
            self.publisher.close(linger=0)
        self.router.close(linger=0)
        self.utilization.close()

    def serve_once(self, timeout_ms: int) -> None:
        events = dict(self.poller.poll(timeout_ms))
        copying = len(self.cluster.copying)
        if self.router in events:
            self._drain_router()
        for sock in events:
            self.orders.on_readable(sock)
        now = time.monotonic()
        wall = time.time()
        dead, drops = self.cluster.tick(now)
        for server_id in dead:
            log.warning("page server dead server_id=%s", server_id)
            self.orders.close_link(server_id)
        self.orders.send_drops(drops)
        self._utilization(now)
        self.orders.expire(now)
        if now >= self._next_plan or len(self.cluster.copying) < copying:
            # Planning walks every slab: at most every PLAN_INTERVAL, not per message, but at
            # once when a copy ended, so a prepared push takes its slot without a wait.
            self._next_plan = now + PLAN_INTERVAL
            pushes, drops = self.cluster.plan(now, wall)
            if not self.cluster.in_grace(now):
                self.metrics.planning_rounds.inc()
            self.orders.send_drops(drops)
            for push in pushes:
                self.orders.send_push(push)
        self._publish()

    # -- the ROUTER --------------------------------------------------------------------------

    def _drain_router(self) -> None:
        for _ in range(MAX_BURST):
            try:
                # copy=False: each Frame carries its sender's User-Id (Curve identity).
                frames = self.router.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self.metrics.bytes_in.inc(frames_bytes(frames))
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
        self.metrics.bytes_out.inc(frames_bytes(out))
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
        link = self.orders.links.get(msg.server_id)
        if link is not None and (
            link.endpoint != msg.data_endpoint
            or self.server_keys.get(msg.server_id) != msg.public_key
        ):
            self.orders.close_link(msg.server_id)
        if msg.public_key is not None:
            self.server_keys[msg.server_id] = msg.public_key
        self.orders.ask_inventory(msg.server_id)
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
            self.orders.send_drops(drops)
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
            self.orders.ask_inventory(msg.server_id)
        return ReportFailureReply(
            msg_id=0, parent_id=msg.msg_id, server_state=state, epoch=self.cluster.epoch
        )

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


def _bind(sock: zmq.Socket[bytes], endpoint: str) -> str:
    sock.bind(bind_address(endpoint))
    bound = sock.getsockopt(zmq.LAST_ENDPOINT)
    assert isinstance(bound, bytes)
    return bound.decode()

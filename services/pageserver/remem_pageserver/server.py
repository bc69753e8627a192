"""The page server's ZeroMQ loop: decode requests, call the store, answer; push slabs to peers.

One thread owns the arena: the ROUTER socket and every push job are served from one loop, so
the store needs no locks and a push reads a page and a client overwrites it in a well-defined
order. Batches keep the per-message cost small. While no push is running the loop blocks in
recv on the ROUTER alone: on these VMs a zmq_poll wake-up adds ~100 us to every round trip
that a blocking recv does not. Heartbeats to placement run in their own thread with their own
socket; they only read the store's counters. `start` assembles the service from its config
for `remem_common.lifecycle.run_service`.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
import zmq
from prometheus_client import REGISTRY
from pydantic import Field, TypeAdapter
from remem_common.config import bind_address
from remem_common.framing import DELIMITER, decode, encode, split_routing
from remem_common.lifecycle import Lifecycle, Servable, Started
from remem_common.protocol.client_pageserver import (
    DeletePagesReply,
    DeletePagesRequest,
    GetPagesRequest,
    PutPagesRequest,
    get_pages_reply_header,
    put_pages_reply_header,
)
from remem_common.protocol.envelope import (
    MALFORMED_REASONS,
    ErrorCode,
    ErrorReply,
    ProtocolError,
)
from remem_common.protocol.pages import (
    PAGE_SIZE,
    bad_checksums,
    make_keys,
    unpack_crcs,
    unpack_keys,
    unpack_page_indices,
    unpack_pages,
    unpack_seals,
)
from remem_common.protocol.pageserver_peer import ReceiveSlabPagesReply, ReceiveSlabPagesRequest
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
    SlabInventory,
)
from remem_common.security import (
    Identity,
    KeyFileError,
    Role,
    Security,
    load_public_key,
    permits,
)
from remem_common.wire import has_message, recv_frames, send_frames

from remem_pageserver.config import PageServerConfig, advertised_endpoint
from remem_pageserver.metrics import PageServerMetrics, StoreGauges
from remem_pageserver.store import ArenaError, NoSpaceError, PageStore

log = logging.getLogger("pageserver")

ServedRequest = Annotated[
    PutPagesRequest
    | GetPagesRequest
    | DeletePagesRequest
    | ListInventoryRequest
    | DropSlabRequest
    | PushSlabRequest
    | ReceiveSlabPagesRequest,
    Field(discriminator="type"),
]
SERVED_ADAPTER: TypeAdapter[ServedRequest] = TypeAdapter(ServedRequest)
PEER_REPLY_ADAPTER: TypeAdapter[ReceiveSlabPagesReply | ErrorReply] = TypeAdapter(
    Annotated[ReceiveSlabPagesReply | ErrorReply, Field(discriminator="type")]
)
PLACEMENT_REPLY_ADAPTER: TypeAdapter[RegisterServerReply | HeartbeatReply | ErrorReply] = (
    TypeAdapter(
        Annotated[RegisterServerReply | HeartbeatReply | ErrorReply, Field(discriminator="type")]
    )
)

OP_OF = {
    "put_pages_request": "put",
    "get_pages_request": "get",
    "delete_pages_request": "delete",
    "list_inventory_request": "inventory",
    "drop_slab_request": "drop_slab",
    "push_slab_request": "push_slab",
    "receive_slab_pages_request": "receive_slab",
}
# Messages taken from the ROUTER per poll wake-up before timers and push replies get a turn.
MAX_BURST = 256
# A slab push streams chunks of this many pages with this many chunks in flight: 1 MiB
# chunks amortize per-message cost, and a window of 4 keeps the link busy without letting one
# push take all of the loop's time from clients.
PUSH_CHUNK_PAGES = 256
PUSH_WINDOW = 4
POLL_MS = 100
# At shutdown, the data socket is unbound once it has had no request for this long.
SHUTDOWN_QUIET = 0.25
# Who may send what (with Curve): clients their own tenant's pages, placement its slab
# orders, peers the pushed pages of any tenant. Without Curve everyone may do everything.
ROLES_OF: dict[str, tuple[Role, ...]] = {
    "put_pages_request": ("client",),
    "get_pages_request": ("client",),
    "delete_pages_request": ("client",),
    "list_inventory_request": ("placement",),
    "drop_slab_request": ("placement",),
    "push_slab_request": ("placement",),
    "receive_slab_pages_request": ("pageserver",),
}
# The roles whose keys the page server admits at all.
ADMITTED_ROLES: tuple[Role, ...] = ("client", "placement", "pageserver")

Frames = list[Any]


@dataclass
class PushJob:
    """One slab being copied to a peer; driven by the loop, never blocking it."""

    routing: Frames
    request: PushSlabRequest
    socket: zmq.Socket[bytes]
    pages: np.ndarray[Any, np.dtype[np.uint32]]
    started: float
    last_progress: float
    cursor: int = 0
    sent_pages: int = 0
    corrupt: int = 0
    inflight: dict[int, int] = field(default_factory=dict)


class PlacementLink:
    """Registration and heartbeats to placement over one DEALER; one request in flight."""

    def __init__(
        self,
        context: zmq.Context[zmq.Socket[bytes]],
        endpoint: str,
        make_register: Callable[[int], RegisterServerRequest],
        make_heartbeat: Callable[[int], HeartbeatRequest],
        metrics: PageServerMetrics,
        *,
        security: Security,
        placement_key: str | None,
    ) -> None:
        self.socket: zmq.Socket[bytes] = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        security.client_socket(self.socket, placement_key)
        # Queue nothing for a placement that is down: a stale heartbeat delivered later lies.
        self.socket.setsockopt(zmq.IMMEDIATE, 1)
        self.socket.connect(endpoint)
        self.endpoint = endpoint
        self._make_register = make_register
        self._make_heartbeat = make_heartbeat
        self._metrics = metrics
        self.registered = False
        self.interval = 0.5
        self._pending: tuple[int, float] | None = None
        self._next_due = 0.0
        self._msg_id = 0

    def due_in(self, now: float) -> float:
        if self._pending is not None:
            return max(0.0, self._pending[1] + 2 * self.interval - now)
        return max(0.0, self._next_due - now)

    def tick(self, now: float) -> None:
        if self._pending is not None:
            if now - self._pending[1] < 2 * self.interval:
                return
            self._metrics.heartbeat_failures.inc()
            if self.registered:
                log.warning("placement did not answer a heartbeat endpoint=%s", self.endpoint)
            self._pending = None
        if now < self._next_due:
            return
        self._msg_id += 1
        msg = (
            self._make_heartbeat(self._msg_id)
            if self.registered
            else self._make_register(self._msg_id)
        )
        try:
            self.socket.send_multipart(encode(msg), flags=zmq.NOBLOCK)
        except zmq.Again:
            self._next_due = now + self.interval
            return
        self._pending = (self._msg_id, now)
        self._next_due = now + self.interval

    def on_readable(self) -> None:
        while True:
            try:
                frames = self.socket.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                reply, _ = decode(frames, PLACEMENT_REPLY_ADAPTER)
            except ProtocolError as exc:
                log.warning("placement sent a malformed reply: %s", exc.detail)
                _count_malformed(self._metrics, exc)
                continue
            if self._pending is None or reply.parent_id != self._pending[0]:
                continue
            self._pending = None
            if isinstance(reply, RegisterServerReply):
                if not self.registered:
                    log.info("registered with placement endpoint=%s", self.endpoint)
                self.registered = True
                self.interval = reply.heartbeat_interval
            elif isinstance(reply, HeartbeatReply):
                if not reply.registered:
                    self.registered = False
                    self._next_due = 0.0
            else:
                log.warning("placement refused: %s %s", reply.error_code, reply.detail)

    def run(self, stop: threading.Event) -> None:
        """Register and heartbeat until `stop` is set (the body of the link's thread)."""
        try:
            while not stop.is_set():
                self.tick(time.monotonic())
                wait = min(self.due_in(time.monotonic()), POLL_MS / 1000)
                if self.socket.poll(max(1, int(wait * 1000))):
                    self.on_readable()
        finally:
            self.socket.close(linger=0)


class PageServer:
    """Serves one arena on one ROUTER socket until asked to stop."""

    def __init__(
        self,
        config: PageServerConfig,
        store: PageStore,
        metrics: PageServerMetrics,
        context: zmq.Context[zmq.Socket[bytes]],
        *,
        server_id: str,
        security: Security | None = None,
    ) -> None:
        self.config = config
        self.security = security or Security.insecure()
        self.store = store
        self.metrics = metrics
        self.context = context
        self.server_id = server_id
        self.router: zmq.Socket[bytes] = context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        # A client that vanished must not make us block or raise; its replies are dropped.
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.security.server_socket(self.router)
        self.poller = zmq.Poller()
        self.poller.register(self.router, zmq.POLLIN)
        self.placement: PlacementLink | None = None
        self._placement_thread: threading.Thread | None = None
        self._placement_stop = threading.Event()
        self._jobs: dict[zmq.Socket[bytes], PushJob] = {}
        self._rcvtimeo = -1  # the router's RCVTIMEO, set only when it changes
        self._stopping = False
        self._msg_id = 0
        self.started_at = time.time()
        self.under_pressure = False
        self._handlers: dict[str, Callable[[Frames, Any, list[Any]], Frames | None]] = {
            "put_pages_request": self._put,
            "get_pages_request": self._get,
            "delete_pages_request": self._delete,
            "list_inventory_request": self._inventory,
            "drop_slab_request": self._drop_slab,
            "push_slab_request": self._push_slab,
            "receive_slab_pages_request": self._receive_slab,
        }

    # -- lifecycle -------------------------------------------------------------------------

    def bind(self, endpoint: str) -> str:
        """Bind the ROUTER; returns the endpoint actually bound (with the chosen port)."""
        self.router.bind(endpoint)
        bound = self.router.getsockopt(zmq.LAST_ENDPOINT)
        assert isinstance(bound, bytes)
        return bound.decode()

    def connect_placement(
        self,
        endpoint: str,
        *,
        data_endpoint: str,
        metrics_url: str,
        placement_key: str | None = None,
    ) -> None:
        """Register with placement at `endpoint` and heartbeat, from a thread of its own.

        Args:
            endpoint: placement's ZeroMQ endpoint.
            data_endpoint: where clients and peers reach this server (the advertised one).
            metrics_url: where placement scrapes this server's utilization.
            placement_key: placement's Curve public key (None without Curve).
        """
        store = self.store

        def register(msg_id: int) -> RegisterServerRequest:
            return RegisterServerRequest(
                msg_id=msg_id,
                server_id=self.server_id,
                data_endpoint=data_endpoint,
                metrics_url=metrics_url,
                capacity_bytes=store.capacity_pages * PAGE_SIZE,
                used_bytes=store.used_pages * PAGE_SIZE,
                zone=self.config.zone,
                started_at=self.started_at,
                public_key=self.security.public_key,
            )

        def heartbeat(msg_id: int) -> HeartbeatRequest:
            return HeartbeatRequest(
                msg_id=msg_id,
                server_id=self.server_id,
                used_bytes=store.used_pages * PAGE_SIZE,
                capacity_bytes=store.capacity_pages * PAGE_SIZE,
                under_pressure=self._check_pressure(),
            )

        self.placement = PlacementLink(
            self.context,
            endpoint,
            register,
            heartbeat,
            self.metrics,
            security=self.security,
            placement_key=placement_key,
        )
        self._placement_thread = threading.Thread(
            target=self.placement.run,
            args=(self._placement_stop,),
            name="placement-link",
            daemon=True,
        )
        self._placement_thread.start()

    def _check_pressure(self) -> bool:
        """Is the host short of memory (MemAvailable under --host-reserve)? Kept for the
        pressure gauge; asked at each heartbeat."""
        reserve = int(self.config.host_reserve)
        self.under_pressure = reserve > 0 and host_available_bytes() < reserve
        return self.under_pressure

    def request_stop(self) -> None:
        """Ask the loop to finish (safe from a signal handler)."""
        self._stopping = True

    def serve_forever(self) -> None:
        """Serve until `request_stop`, then finish queued work within the drain timeout."""
        while not self._stopping:
            self._serve_once()
        self._shutdown()

    def _serve_once(self, timeout_ms: int = POLL_MS) -> None:
        if not self._jobs:
            if timeout_ms != self._rcvtimeo:
                self.router.setsockopt(zmq.RCVTIMEO, timeout_ms)
                self._rcvtimeo = timeout_ms
            try:
                frames = recv_frames(self.router, block=True)
            except zmq.Again:
                return
            self._handle(frames)
            self._drain_router()
            return
        events = dict(self.poller.poll(timeout_ms))
        if self.router in events:
            self._drain_router()
        for sock in events:
            job = self._jobs.get(sock)
            if job is not None:
                self._on_push_reply(job)
        now = time.monotonic()
        for job in list(self._jobs.values()):
            if now - job.last_progress > job.request.timeout:
                self._finish_push(
                    job,
                    ErrorCode.UNAVAILABLE,
                    f"target {job.request.target_endpoint} did not answer for "
                    f"{job.request.timeout}s",
                )

    def _shutdown(self) -> None:
        log.info("stopping: finishing queued requests, then no new connections")
        # Unbinding also drops the connections accepted on the endpoint, with whatever their
        # peers had sent that is still on its way: so first serve until the socket has been
        # quiet for a moment (or the drain timeout), then unbind and serve what is left.
        deadline = time.monotonic() + self.config.drain_timeout
        quiet_since = time.monotonic()
        while (now := time.monotonic()) < deadline and now - quiet_since < SHUTDOWN_QUIET:
            if self._drain_router() or self._jobs:
                quiet_since = now
            if self._jobs:
                self._serve_once(10)
            else:
                self.router.poll(10)
        for endpoint in (self.router.getsockopt(zmq.LAST_ENDPOINT),):
            assert isinstance(endpoint, bytes)
            with contextlib.suppress(zmq.ZMQError):
                self.router.unbind(endpoint.decode())
        while time.monotonic() < deadline:
            handled = self._drain_router()
            if not handled and not self._jobs:
                break
            if self._jobs:
                self._serve_once(10)
        for job in list(self._jobs.values()):
            self._finish_push(job, ErrorCode.SHUTTING_DOWN, "page server is stopping")

    def close(self) -> None:
        """Stop the placement link and close the ROUTER (also when serving never began)."""
        self._placement_stop.set()
        if self._placement_thread is not None:
            self._placement_thread.join(timeout=5)
        for job in list(self._jobs.values()):
            self._jobs.pop(job.socket, None)
            job.socket.close(linger=0)
        self.router.close(linger=0)

    # -- request dispatch ------------------------------------------------------------------

    def _drain_router(self) -> int:
        handled = 0
        router = self.router
        # Asking EVENTS first: a zmq.Again raised at the end of every burst cost ~3% of a
        # one-page GET's CPU (exception and enum objects).
        while handled < MAX_BURST and has_message(router):
            try:
                frames = recv_frames(router)
            except zmq.Again:
                break
            handled += 1
            self._handle(frames)
        return handled

    def _handle(self, frames: Frames) -> None:
        started = time.perf_counter()
        op: str | None = None
        msg_id = 0
        routing = frames[:1]  # a ROUTER always prepends the sender's id
        reply: Frames | None
        failed = True
        try:
            routing, body = split_routing(frames)
            msg, payload = decode(body, SERVED_ADAPTER)
            msg_id = msg.msg_id
            op = OP_OF[msg.type]
            self._authorize(self.security.identity(frames[0]), msg)
            reply = self._handlers[msg.type](routing, msg, payload)
            failed = False
        except ProtocolError as exc:
            _count_malformed(self.metrics, exc)
            reply = self._error(exc.code, exc.detail, exc.msg_id or msg_id)
        except NoSpaceError as exc:
            reply = self._error(ErrorCode.NO_SPACE, str(exc), msg_id)
        except Exception:
            # Never let one request take the server down; the sender learns it failed.
            log.exception("internal error handling %s", op)
            reply = self._error(ErrorCode.INTERNAL, "internal error; see the server log", msg_id)
        if reply is None:
            return  # answered later (a slab push replies when the copy is done)
        if op is not None:
            (self.metrics.error if failed else self.metrics.ok)[op].inc()
            self.metrics.latency[op].observe(time.perf_counter() - started)
        try:
            send_frames(self.router, [*routing, *reply])
        except zmq.Again:
            log.warning("dropped a reply: the client is not reading")

    def _authorize(self, identity: Identity | None, msg: Any) -> None:
        """Raise `forbidden` unless the sender's key may make this request (and counts it)."""
        tenant = getattr(msg, "tenant", None)
        if permits(identity, ROLES_OF[msg.type], tenant):
            return
        what = f"{OP_OF[msg.type]} pages of tenant {tenant}" if tenant else OP_OF[msg.type]
        raise self.metrics.auth.forbid(identity, what, msg.msg_id)

    @staticmethod
    def _error(code: ErrorCode, detail: str, parent_id: int) -> Frames:
        return encode(ErrorReply(msg_id=0, parent_id=parent_id, error_code=code, detail=detail))

    @staticmethod
    def _expect_frames(payload: list[Any], count: int, what: str) -> None:
        if len(payload) != count:
            raise ProtocolError(
                ErrorCode.MALFORMED,
                f"{what} takes {count} payload frames, got {len(payload)}",
                reason="bad_frames",
            )

    # -- data plane ------------------------------------------------------------------------

    def _put(self, routing: Frames, msg: PutPagesRequest, payload: list[Any]) -> Frames:
        self._expect_frames(payload, 4, msg.type)
        keys = unpack_keys(payload[0], msg.count)
        crcs = unpack_crcs(payload[1], msg.count)
        pages = unpack_pages(payload[2], msg.count)
        seals = unpack_seals(payload[3], msg.count)
        _verify(pages, crcs)
        stored, _ = self.store.put(msg.tenant, msg.volume, keys, crcs, pages, seals)
        self.metrics.pages_in.inc(stored)
        return [DELIMITER, put_pages_reply_header(msg.msg_id, stored)]

    def _get(self, routing: Frames, msg: GetPagesRequest, payload: list[Any]) -> Frames:
        self._expect_frames(payload, 1, msg.type)
        keys = unpack_keys(payload[0], msg.count)
        result = self.store.get(msg.tenant, msg.volume, keys)
        self.metrics.pages_out.inc(msg.count)
        return [
            DELIMITER,
            get_pages_reply_header(msg.msg_id, msg.count),
            result.found.view(np.uint8),
            result.crcs,
            result.data,
            result.seals,
        ]

    def _delete(self, routing: Frames, msg: DeletePagesRequest, payload: list[Any]) -> Frames:
        self._expect_frames(payload, 1, msg.type)
        keys = unpack_keys(payload[0], msg.count)
        deleted = self.store.delete(msg.tenant, msg.volume, keys)
        return encode(DeletePagesReply(msg_id=0, parent_id=msg.msg_id, deleted=deleted))

    # -- slab operations (placement and peers) ---------------------------------------------

    def _inventory(self, routing: Frames, msg: ListInventoryRequest, payload: list[Any]) -> Frames:
        self._expect_frames(payload, 0, msg.type)
        slabs = [
            SlabInventory(tenant=tenant, volume=volume, slab=slab, pages=pages)
            for tenant, volume, slab, pages in self.store.inventory()
        ]
        return encode(
            ListInventoryReply(
                msg_id=0, parent_id=msg.msg_id, server_id=self.server_id, slabs=slabs
            )
        )

    def _drop_slab(self, routing: Frames, msg: DropSlabRequest, payload: list[Any]) -> Frames:
        self._expect_frames(payload, 0, msg.type)
        dropped = self.store.drop_slab(msg.tenant, msg.volume, msg.slab)
        log.info(
            "dropped slab tenant=%s volume=%d slab=%d pages=%d",
            msg.tenant,
            msg.volume,
            msg.slab,
            dropped,
        )
        return encode(DropSlabReply(msg_id=0, parent_id=msg.msg_id, dropped=dropped))

    def _receive_slab(
        self, routing: Frames, msg: ReceiveSlabPagesRequest, payload: list[Any]
    ) -> Frames:
        self._expect_frames(payload, 4, msg.type)
        pages_idx = unpack_page_indices(payload[0], msg.count)
        crcs = unpack_crcs(payload[1], msg.count)
        pages = unpack_pages(payload[2], msg.count)
        seals = unpack_seals(payload[3], msg.count)
        _verify(pages, crcs)
        keys = make_keys(np.full(msg.count, msg.slab, dtype=np.uint32), pages_idx)
        stored, skipped = self.store.put(
            msg.tenant, msg.volume, keys, crcs, pages, seals, overwrite=msg.overwrite
        )
        self.metrics.push_received_bytes.inc(stored * PAGE_SIZE)
        self.metrics.pages_in.inc(stored)
        return encode(
            ReceiveSlabPagesReply(msg_id=0, parent_id=msg.msg_id, stored=stored, skipped=skipped)
        )

    def _push_slab(
        self, routing: Frames, msg: PushSlabRequest, payload: list[Any]
    ) -> Frames | None:
        self._expect_frames(payload, 0, msg.type)
        sock: zmq.Socket[bytes] = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            self.security.client_socket(sock, msg.target_public_key)
        except KeyFileError:
            sock.close(linger=0)
            raise ProtocolError(
                ErrorCode.MALFORMED,
                "push_slab_request needs target_public_key: this page server runs Curve",
                reason="bad_fields",
                msg_id=msg.msg_id,
            ) from None
        try:
            sock.connect(msg.target_endpoint)
        except zmq.ZMQError as exc:
            # The protocol refuses endpoints libzmq cannot parse; this catches the rest. An
            # unclosed socket would make context.term() hang at shutdown.
            sock.close(linger=0)
            raise ProtocolError(
                ErrorCode.MALFORMED,
                f"target_endpoint {msg.target_endpoint!r}: {exc}",
                reason="bad_fields",
                msg_id=msg.msg_id,
            ) from None
        now = time.monotonic()
        job = PushJob(
            routing=routing,
            request=msg,
            socket=sock,
            pages=self.store.slab_pages(msg.tenant, msg.volume, msg.slab),
            started=now,
            last_progress=now,
        )
        self._jobs[sock] = job
        self.poller.register(sock, zmq.POLLIN)
        log.info(
            "pushing slab tenant=%s volume=%d slab=%d pages=%d to=%s",
            msg.tenant,
            msg.volume,
            msg.slab,
            job.pages.size,
            msg.target_endpoint,
        )
        self._push_more(job)
        return None

    def _push_more(self, job: PushJob) -> None:
        req = job.request
        while len(job.inflight) < PUSH_WINDOW and job.cursor < job.pages.size:
            chunk = job.pages[job.cursor : job.cursor + PUSH_CHUNK_PAGES]
            job.cursor += chunk.size
            keys = make_keys(np.full(chunk.size, req.slab, dtype=np.uint32), chunk)
            result = self.store.get(req.tenant, req.volume, keys)
            # Pages trimmed since the push began are gone; pages whose checksum no longer
            # matches are not spread to another server.
            ok = result.found.copy()
            ok[ok] = _crc_ok(result.data[ok], result.crcs[ok])
            job.corrupt += int(np.count_nonzero(result.found & ~ok))
            count = int(np.count_nonzero(ok))
            if not count:
                continue
            self._msg_id += 1
            msg = ReceiveSlabPagesRequest(
                msg_id=self._msg_id,
                source_server=self.server_id,
                tenant=req.tenant,
                volume=req.volume,
                slab=req.slab,
                count=count,
            )
            whole = count == chunk.size
            data = result.data if whole else result.data[ok]
            # The seals travel with their pages: the client decrypts a pushed copy as it
            # would the original.
            seals = result.seals if whole else result.seals[ok]
            job.socket.send_multipart(
                encode(msg, np.ascontiguousarray(chunk[ok]), result.crcs[ok], data, seals),
                copy=False,
            )
            job.inflight[self._msg_id] = count
            job.sent_pages += count
            self.metrics.push_sent_bytes.inc(count * PAGE_SIZE)
        if job.cursor >= job.pages.size and not job.inflight:
            self._finish_push(job, None, "")

    def _on_push_reply(self, job: PushJob) -> None:
        while job.socket in self._jobs:
            try:
                frames = job.socket.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                reply, _ = decode(frames, PEER_REPLY_ADAPTER)
            except ProtocolError as exc:
                _count_malformed(self.metrics, exc)
                self._finish_push(job, ErrorCode.UNAVAILABLE, f"target answered badly: {exc}")
                return
            if isinstance(reply, ErrorReply):
                self._finish_push(
                    job, reply.error_code, f"target refused: {reply.error_code} {reply.detail}"
                )
                return
            if job.inflight.pop(reply.parent_id, None) is None:
                continue
            job.last_progress = time.monotonic()
            self._push_more(job)

    def _finish_push(self, job: PushJob, code: ErrorCode | None, detail: str) -> None:
        self._jobs.pop(job.socket, None)
        self.poller.unregister(job.socket)
        job.socket.close(linger=0)
        req = job.request
        seconds = time.monotonic() - job.started
        reply: Frames
        if code is None:
            self.metrics.ok["push_slab"].inc()
            log.info(
                "pushed slab tenant=%s volume=%d slab=%d pages=%d corrupt=%d seconds=%.3f",
                req.tenant,
                req.volume,
                req.slab,
                job.sent_pages,
                job.corrupt,
                seconds,
            )
            reply = encode(
                PushSlabReply(
                    msg_id=0,
                    parent_id=req.msg_id,
                    pages=job.sent_pages,
                    bytes=job.sent_pages * PAGE_SIZE,
                    seconds=seconds,
                    corrupt=job.corrupt,
                )
            )
        else:
            self.metrics.error["push_slab"].inc()
            log.warning(
                "push failed tenant=%s volume=%d slab=%d: %s",
                req.tenant,
                req.volume,
                req.slab,
                detail,
            )
            reply = encode(
                ErrorReply(msg_id=0, parent_id=req.msg_id, error_code=code, detail=detail)
            )
        self.metrics.latency["push_slab"].observe(seconds)
        try:
            self.router.send_multipart([*job.routing, *reply], flags=zmq.NOBLOCK)
        except zmq.Again:
            log.warning("dropped a push reply: the requester is not reading")


def host_available_bytes() -> int:
    """MemAvailable of this host, from /proc/meminfo."""
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def start(config: PageServerConfig, lifecycle: Lifecycle) -> Started[Servable]:
    """Open the arena, bind, register with placement: the page server, ready to serve."""
    security = Security.from_settings(config, "pageserver")
    placement_key = (
        load_public_key(config.placement_public_key) if config.placement_public_key else None
    )
    with lifecycle.as_config_error(ArenaError, OSError):
        store = PageStore(config.shm_path, config.capacity_pages, forget=config.forget)
    lifecycle.callback(store.close)
    if store.used_pages:
        log.info(
            "arena reopened path=%s pages=%d slabs=%d committed_bytes=%d",
            config.shm_path,
            store.used_pages,
            store.slab_count,
            store.committed_bytes,
        )
    context = lifecycle.zmq_context()
    metrics = PageServerMetrics(REGISTRY)
    lifecycle.serve_security(security, context, ADMITTED_ROLES, metrics.auth)
    listen = bind_address(config.listen)
    port_hint = listen.rsplit(":", 1)[-1]
    server_id = config.server_id or f"{socket.gethostname()}-{port_hint}"
    server = PageServer(config, store, metrics, context, server_id=server_id, security=security)
    lifecycle.callback(server.close)
    with lifecycle.as_failure(f"cannot bind {config.listen}", zmq.ZMQError):
        bound = server.bind(listen)
    if config.server_id is None and port_hint == "*":
        server.server_id = f"{socket.gethostname()}-{bound.rsplit(':', 1)[-1]}"
    metrics.watch_store(
        StoreGauges(
            capacity_bytes=lambda: store.capacity_pages * PAGE_SIZE,
            used_bytes=lambda: store.used_pages * PAGE_SIZE,
            committed_bytes=lambda: store.committed_bytes,
            pages=lambda: store.used_pages,
            slabs=lambda: store.slab_count,
            under_pressure=lambda: server.under_pressure,
        )
    )
    metrics_url = lifecycle.metrics_endpoint(config.metrics_port, config.metrics_host)
    endpoint = advertised_endpoint(bound, config.advertise)
    if config.placement:
        server.connect_placement(
            config.placement,
            data_endpoint=endpoint,
            metrics_url=metrics_url,
            placement_key=placement_key,
        )
    return Started(
        server,
        {
            "endpoint": endpoint,
            "metrics": metrics_url,
            "server_id": server.server_id,
            "zone": config.zone,
            "capacity_pages": store.capacity_pages,
            "pages": store.used_pages,
            "curve": security.enabled,
        },
    )


def _count_malformed(metrics: PageServerMetrics, exc: ProtocolError) -> None:
    """Count a message refused as malformed on any of the server's sockets."""
    if exc.reason in MALFORMED_REASONS:
        metrics.malformed_by[exc.reason].inc()


def _crc_ok(
    pages: np.ndarray[Any, np.dtype[np.uint8]], crcs: np.ndarray[Any, np.dtype[np.uint32]]
) -> np.ndarray[Any, np.dtype[np.bool_]]:
    mask = np.ones(pages.shape[0], dtype=np.bool_)
    mask[bad_checksums(pages, crcs)] = False
    return mask


def _verify(
    pages: np.ndarray[Any, np.dtype[np.uint8]], crcs: np.ndarray[Any, np.dtype[np.uint32]]
) -> None:
    bad = bad_checksums(pages, crcs)
    if bad.size:
        raise ProtocolError(
            ErrorCode.BAD_CHECKSUM,
            f"{bad.size} of {pages.shape[0]} pages do not match their checksum "
            f"(first at batch position {int(bad[0])}); nothing stored",
            reason="bad_checksum",
        )

"""The page server's ZeroMQ loop: decode requests, authorize them, call the store, answer.

One thread owns the arena: the ROUTER (remem_common.router: ZMTP served from this thread
on plaintext links, libzmq with Curve) and every slab push (remem_pageserver.slab_push) are
served from one loop, so the store needs no locks and a push reads a page and a client
overwrites it in a well-defined order. Batches keep the per-message cost small, and so does
the data plane's own path: a put/get/delete header as clients write it is parsed without
pydantic, batches of up to SMALL_PAGES pages are served without numpy, and requests are
counted in plain numbers (remem_pageserver.metrics). While no push
is running the loop waits on the ROUTER alone; with pushes, a zmq.Poller watches the ROUTER
and the pushes' sockets. Registration and heartbeats to placement
(remem_pageserver.registration) run in their own thread with their own socket; they only
read the store's counters.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from time import perf_counter
from typing import Annotated, Any

import numpy as np
import zmq
from pydantic import Field, TypeAdapter
from remem_common.framing import DELIMITER, decode, encode, split_routing
from remem_common.protocol.client_pageserver import (
    DeletePagesReply,
    DeletePagesRequest,
    GetPagesRequest,
    PutPagesRequest,
    get_pages_reply_header,
    parse_pages_request,
    put_pages_reply_header,
)
from remem_common.protocol.envelope import (
    ErrorCode,
    ErrorReply,
    ProtocolError,
)
from remem_common.protocol.pages import (
    PAGE_SIZE,
    SEAL_BYTES,
    SMALL_PAGES,
    bad_checksums,
    bad_row_checksums,
    crc_words,
    key_words,
    make_keys,
    rows_view,
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
    HeartbeatRequest,
    ListInventoryReply,
    ListInventoryRequest,
    PushSlabRequest,
    RegisterServerRequest,
    SlabInventory,
)
from remem_common.router import open_router
from remem_common.security import (
    Identity,
    Role,
    Security,
    permits,
)
from remem_common.zmtp import ZmtpError

from remem_pageserver.checksums import WHOLE_BATCH_PAGES, batch_matches
from remem_pageserver.config import PageServerConfig
from remem_pageserver.metrics import PageServerMetrics
from remem_pageserver.registration import RegistrationLink
from remem_pageserver.slab_push import Frames, SlabPusher
from remem_pageserver.store import NoSpaceError, PageStore

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


OP_OF = {
    "put_pages_request": "put",
    "get_pages_request": "get",
    "delete_pages_request": "delete",
    "list_inventory_request": "inventory",
    "drop_slab_request": "drop_slab",
    "push_slab_request": "push_slab",
    "receive_slab_pages_request": "receive_slab",
}
# (msg_id, tenant, volume, count, payload frames) -> reply frames
PagesHandler = Callable[[int, str, int, int, list[Any]], Frames]
POLL_MS = 100
# At shutdown, the data socket is unbound once it has had no request for this long.
SHUTDOWN_QUIET = 0.25
# Who may send what (with Curve): clients their own tenant's pages, placement its slab
# orders, peers the pushed pages of any tenant. Without Curve everyone may do everything.
DATA_ROLES: tuple[Role, ...] = ("client",)
ROLES_OF: dict[str, tuple[Role, ...]] = {
    "put_pages_request": DATA_ROLES,
    "get_pages_request": DATA_ROLES,
    "delete_pages_request": DATA_ROLES,
    "list_inventory_request": ("placement",),
    "drop_slab_request": ("placement",),
    "push_slab_request": ("placement",),
    "receive_slab_pages_request": ("pageserver",),
}


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
        # Chosen for the endpoint `bind` will be given: config.listen.
        self.router = open_router(
            config.listen, context, self.security, on_violation=self._zmtp_violation
        )
        self.poller = zmq.Poller()
        self.poller.register(self.router.pollable, zmq.POLLIN)
        self.placement: RegistrationLink | None = None
        self._placement_thread: threading.Thread | None = None
        self._placement_stop = threading.Event()
        self.pushes = SlabPusher(
            store, metrics, context, self.router.send, self.poller, self.security
        )
        self._stopping = False
        self.started_at = time.time()
        self.under_pressure = False
        self._pages_handlers: dict[str, PagesHandler] = {
            "put": self._put,
            "get": self._get,
            "delete": self._delete,
        }
        self._handlers: dict[str, Callable[[Frames, Any, list[Any]], Frames | None]] = {
            "put_pages_request": self._pages_request,
            "get_pages_request": self._pages_request,
            "delete_pages_request": self._pages_request,
            "list_inventory_request": self._inventory,
            "drop_slab_request": self._drop_slab,
            "push_slab_request": self._push_slab,
            "receive_slab_pages_request": self._receive_slab,
        }

    # -- lifecycle -------------------------------------------------------------------------

    def bind(self, endpoint: str) -> str:
        """Bind the ROUTER; returns the endpoint actually bound (with the chosen port)."""
        return self.router.bind(endpoint)

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

        self.placement = RegistrationLink(
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

    def _serve_once(self, timeout_ms: int = POLL_MS) -> int:
        """Wait up to `timeout_ms` and serve what came; returns the requests handled."""
        if not self.pushes:
            return self.router.serve(self._handle, timeout_ms)
        events = dict(self.poller.poll(timeout_ms))
        handled = 0
        if self.router.pollable in events:
            handled = self.router.drain(self._handle)
        for sock in events:
            self.pushes.on_readable(sock)
        self.pushes.expire(time.monotonic())
        return handled

    def _shutdown(self) -> None:
        log.info("stopping: finishing queued requests, then no new connections")
        # Unbinding also drops the connections accepted on the endpoint, with whatever their
        # peers had sent that is still on its way: so first serve until the socket has been
        # quiet for a moment (or the drain timeout), then unbind and serve what is left.
        deadline = time.monotonic() + self.config.drain_timeout
        quiet_since = time.monotonic()
        while (now := time.monotonic()) < deadline and now - quiet_since < SHUTDOWN_QUIET:
            if self._serve_once(10) or self.pushes:
                quiet_since = now
        self.router.unbind()
        while time.monotonic() < deadline:
            handled = self.router.drain(self._handle)
            if not handled and not self.pushes:
                break
            if self.pushes:
                self._serve_once(10)
        self.pushes.fail_all(ErrorCode.SHUTTING_DOWN, "page server is stopping")

    def close(self) -> None:
        """Stop the placement link and close the ROUTER (also when serving never began)."""
        self._placement_stop.set()
        if self._placement_thread is not None:
            self._placement_thread.join(timeout=5)
        self.pushes.close()
        self.router.close()

    # -- request dispatch ------------------------------------------------------------------

    def _zmtp_violation(self, exc: ZmtpError) -> None:
        """A peer broke ZMTP (the ZMTP router closed its connection): counted as libzmq's
        ROUTER would not, beside the messages refused as malformed."""
        self.metrics.malformed_by["bad_frames"].inc()

    def _handle(self, frames: Frames) -> None:
        started = perf_counter()
        op: str | None = None
        msg_id = 0
        routing = frames[:1]  # a ROUTER always prepends the sender's id
        reply: Frames | None
        failed = True
        try:
            # A data-plane header as clients write it is read without pydantic (most
            # messages); any other goes through the models, which refuse what is malformed.
            pages_request = (
                parse_pages_request(frames[2]) if len(frames) > 2 and not len(frames[1]) else None
            )
            if pages_request is not None:
                op, msg_id, tenant, volume, count = pages_request
                identity = self.security.identity(frames[0])
                if identity is not None:
                    self._authorize_pages(identity, op, tenant, msg_id)
                reply = self._pages_handlers[op](msg_id, tenant, volume, count, frames[3:])
            else:
                routing, body = split_routing(frames)
                msg, payload = decode(body, SERVED_ADAPTER)
                msg_id = msg.msg_id
                op = OP_OF[msg.type]
                self._authorize(self.security.identity(frames[0]), msg)
                reply = self._handlers[msg.type](routing, msg, payload)
            failed = False
        except ProtocolError as exc:
            self.metrics.count_malformed(exc)
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
            self.metrics.record(op, failed, perf_counter() - started)
        if not self.router.send([*routing, *reply]):
            log.warning("dropped a reply: the client is not reading")

    def _authorize(self, identity: Identity | None, msg: Any) -> None:
        """Raise `forbidden` unless the sender's key may make this request (and counts it)."""
        tenant = getattr(msg, "tenant", None)
        if permits(identity, ROLES_OF[msg.type], tenant):
            return
        what = f"{OP_OF[msg.type]} pages of tenant {tenant}" if tenant else OP_OF[msg.type]
        raise self.metrics.auth.forbid(identity, what, msg.msg_id)

    def _authorize_pages(self, identity: Identity, op: str, tenant: str, msg_id: int) -> None:
        """`_authorize` of a put/get/delete_pages_request."""
        if not permits(identity, DATA_ROLES, tenant):
            raise self.metrics.auth.forbid(identity, f"{op} pages of tenant {tenant}", msg_id)

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

    def _pages_request(self, routing: Frames, msg: Any, payload: list[Any]) -> Frames:
        """A put/get/delete_pages_request whose header the models validated."""
        op = OP_OF[msg.type]
        return self._pages_handlers[op](msg.msg_id, msg.tenant, msg.volume, msg.count, payload)

    def _put(self, msg_id: int, tenant: str, volume: int, count: int, payload: list[Any]) -> Frames:
        self._expect_frames(payload, 4, "put_pages_request")
        if count <= SMALL_PAGES:
            # Checked without numpy, and stored so if every page is held already; a batch
            # with new pages is stored by `put`, which allocates their slots.
            keys = key_words(payload[0], count)
            crcs = crc_words(payload[1], count)
            pages = rows_view(payload[2], count, PAGE_SIZE, "data")
            seals = rows_view(payload[3], count, SEAL_BYTES, "seals")
            bad = bad_row_checksums(pages, crcs)
            if bad:
                raise _bad_checksum(len(bad), count, bad[0])
            stored = self.store.overwrite_small(tenant, volume, keys, crcs, pages, seals)
            if stored is not None:
                self.metrics.pages_tally[0] += stored
                return [DELIMITER, put_pages_reply_header(msg_id, stored)]
        keys_array = unpack_keys(payload[0], count)
        crcs_array = unpack_crcs(payload[1], count)
        pages_array = unpack_pages(payload[2], count)
        seals_array = unpack_seals(payload[3], count)
        if count > SMALL_PAGES:  # a small batch was verified above
            _verify(pages_array, crcs_array)
        stored, _ = self.store.put(tenant, volume, keys_array, crcs_array, pages_array, seals_array)
        self.metrics.pages_tally[0] += stored
        return [DELIMITER, put_pages_reply_header(msg_id, stored)]

    def _get(self, msg_id: int, tenant: str, volume: int, count: int, payload: list[Any]) -> Frames:
        self._expect_frames(payload, 1, "get_pages_request")
        if count <= SMALL_PAGES:
            found, crcs, data, seals = self.store.get_small(
                tenant, volume, key_words(payload[0], count)
            )
            self.metrics.pages_tally[1] += count
            return [DELIMITER, get_pages_reply_header(msg_id, count), found, crcs, data, seals]
        result = self.store.get(tenant, volume, unpack_keys(payload[0], count))
        self.metrics.pages_tally[1] += count
        return [
            DELIMITER,
            get_pages_reply_header(msg_id, count),
            result.found.view(np.uint8),
            result.crcs,
            result.data,
            result.seals,
        ]

    def _delete(
        self, msg_id: int, tenant: str, volume: int, count: int, payload: list[Any]
    ) -> Frames:
        self._expect_frames(payload, 1, "delete_pages_request")
        keys = unpack_keys(payload[0], count)
        deleted = self.store.delete(tenant, volume, keys)
        return encode(DeletePagesReply(msg_id=0, parent_id=msg_id, deleted=deleted))

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
        self.metrics.pages_tally[0] += stored
        return encode(
            ReceiveSlabPagesReply(msg_id=0, parent_id=msg.msg_id, stored=stored, skipped=skipped)
        )

    def _push_slab(
        self, routing: Frames, msg: PushSlabRequest, payload: list[Any]
    ) -> Frames | None:
        self._expect_frames(payload, 0, msg.type)
        self.pushes.start(routing, msg, source_server=self.server_id)
        return None  # answered when the copy is done


def host_available_bytes() -> int:
    """MemAvailable of this host, from /proc/meminfo."""
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _verify(
    pages: np.ndarray[Any, np.dtype[np.uint8]], crcs: np.ndarray[Any, np.dtype[np.uint32]]
) -> None:
    """Refuse the batch unless every page matches its checksum (a large batch is checked
    whole first: remem_pageserver.checksums)."""
    if crcs.shape[0] >= WHOLE_BATCH_PAGES and batch_matches(pages, crcs):
        return
    bad = bad_checksums(pages, crcs)
    if bad.size:
        raise _bad_checksum(bad.size, pages.shape[0], int(bad[0]))


def _bad_checksum(bad: int, count: int, first: int) -> ProtocolError:
    return ProtocolError(
        ErrorCode.BAD_CHECKSUM,
        f"{bad} of {count} pages do not match their checksum "
        f"(first at batch position {first}); nothing stored",
        reason="bad_checksum",
    )

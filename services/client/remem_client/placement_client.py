"""The client's link to placement: slab allocation, the slab map by epoch, failure reports.

Placement is off the data path: it is asked once per slab (the first write), polled for map
changes once a second and at once after a replica failed, and told about failures. Its
answers are applied to the remote backend's slab map, so a replica placement declared dead
is never read again and a re-replicated slab's new replica gets every later write.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from typing import Annotated, Any

import zmq
import zmq.asyncio
from pydantic import BaseModel, Field, TypeAdapter
from remem_common.framing import decode, encode
from remem_common.protocol.client_placement import (
    AllocateSlabReply,
    AllocateSlabRequest,
    GetMapReply,
    GetMapRequest,
    ReplicaRef,
    ReportFailureReply,
    ReportFailureRequest,
)
from remem_common.protocol.envelope import ErrorCode, ErrorReply, ProtocolError
from remem_common.security import Security

from remem_client.metrics import MalformedReplies
from remem_client.remote_backend import RemoteBackend, Replica

log = logging.getLogger("client.placement")

PlacementReply = Annotated[
    AllocateSlabReply | GetMapReply | ReportFailureReply | ErrorReply,
    Field(discriminator="type"),
]
REPLY_ADAPTER: TypeAdapter[PlacementReply] = TypeAdapter(PlacementReply)


class PlacementError(Exception):
    """Placement refused or did not answer."""

    def __init__(self, code: ErrorCode | str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


def _replicas(refs: list[ReplicaRef]) -> list[Replica]:
    return [Replica(ref.server_id, ref.endpoint, ref.public_key) for ref in refs]


class PlacementClient:
    """Implements `remote_backend.SlabPlacement` over placement's ROUTER."""

    def __init__(
        self,
        endpoint: str,
        *,
        tenant: str,
        volume: int,
        replicas: int,
        context: zmq.Context[zmq.Socket[bytes]],
        timeout: float = 5.0,
        poll_interval: float = 1.0,
        malformed: MalformedReplies | None = None,
        security: Security | None = None,
        server_key: str | None = None,
    ) -> None:
        self.endpoint = endpoint
        self._malformed = malformed
        self.tenant = tenant
        self.volume = volume
        self.replicas = replicas
        self.timeout = timeout
        self.poll_interval = poll_interval
        self._async_context = zmq.asyncio.Context.shadow(context.underlying)
        self._socket = self._async_context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        (security or Security.insecure()).client_socket(self._socket, server_key)
        self._socket.connect(endpoint)
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._backend: RemoteBackend | None = None
        self._refresh = asyncio.Event()
        self.epoch = 0
        self.degraded: list[int] = []

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self, backend: RemoteBackend) -> None:
        """Begin reading replies and polling the map; adopt the map placement has now (so a
        restarted client serves the slabs it had)."""
        self._backend = backend
        self._spawn(self._read_replies())
        try:
            await self.refresh_map()
        except PlacementError as exc:
            log.warning("placement has no map for us yet: %s", exc)
        self._spawn(self._poll_map())

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._socket.close(linger=0)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- requests --------------------------------------------------------------------------

    async def _call(self, msg: BaseModel, msg_id: int) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._waiting[msg_id] = future
        timer: asyncio.TimerHandle | None = None
        try:
            await self._socket.send_multipart(encode(msg))
            # A timer, not asyncio.wait_for: the NBD layer runs the remote backend's requests
            # without a Task (`task_free`), and from Python 3.12 wait_for needs one.
            timer = loop.call_later(self.timeout, _time_out, future)
            reply = await future
        except TimeoutError:
            raise PlacementError("timeout", f"placement {self.endpoint} did not answer") from None
        finally:
            if timer is not None:
                timer.cancel()
            self._waiting.pop(msg_id, None)
        if isinstance(reply, ErrorReply):
            raise PlacementError(reply.error_code, reply.detail)
        return reply

    async def _read_replies(self) -> None:
        while True:
            frames = await self._socket.recv_multipart()
            try:
                reply, _ = decode(frames, REPLY_ADAPTER)
            except ProtocolError as exc:
                log.warning("malformed reply from placement: %s", exc.detail)
                if self._malformed is not None:
                    self._malformed.count("placement", exc)
                continue
            future = self._waiting.get(reply.parent_id)
            if future is not None and not future.done():
                future.set_result(reply)

    async def allocate(self, slab: int) -> list[Replica]:
        """Replicas of `slab`; retried while placement is rebuilding after a restart."""
        for _ in range(30):
            msg_id = next(self._ids)
            try:
                reply = await self._call(
                    AllocateSlabRequest(
                        msg_id=msg_id,
                        tenant=self.tenant,
                        volume=self.volume,
                        slab=slab,
                        replicas=self.replicas,
                    ),
                    msg_id,
                )
            except PlacementError as exc:
                if exc.code in (ErrorCode.UNAVAILABLE, "timeout"):
                    log.info(
                        "placement not ready (%s); retrying allocation of slab %d", exc.code, slab
                    )
                    await asyncio.sleep(0.5)
                    continue
                raise
            assert isinstance(reply, AllocateSlabReply)
            if reply.degraded:
                log.warning(
                    "slab %d placed degraded: %d of %d replicas",
                    slab,
                    len(reply.replicas),
                    self.replicas,
                )
            if self._backend is not None and reply.filling:
                self._backend.set_replicas(
                    slab, _replicas(reply.replicas), _replicas(reply.filling)
                )
            return _replicas(reply.replicas)
        raise PlacementError(ErrorCode.UNAVAILABLE, "placement stayed unavailable")

    def report_failure(
        self, server_id: str, slab: int, detail: str, *, missed_write: bool = False
    ) -> None:
        """Tell placement (in the background) and re-read the map soon."""
        self._spawn(self._report(server_id, slab, detail, missed_write))

    async def _report(self, server_id: str, slab: int, detail: str, missed_write: bool) -> None:
        msg_id = next(self._ids)
        try:
            reply = await self._call(
                ReportFailureRequest(
                    msg_id=msg_id,
                    tenant=self.tenant,
                    volume=self.volume,
                    slab=slab,
                    server_id=server_id,
                    detail=detail[:512],
                    missed_write=missed_write,
                ),
                msg_id,
            )
            log.info("reported %s to placement: now %s", server_id, reply.server_state)
            if missed_write and self._backend is not None:
                self._backend.stale_reported(server_id, slab, reply.epoch)
        except PlacementError as exc:
            log.warning("could not report %s to placement: %s", server_id, exc)
        self._refresh.set()

    # -- the map ---------------------------------------------------------------------------

    async def refresh_map(self) -> None:
        """Fetch the volume's map if it changed since the last one applied, and apply it."""
        msg_id = next(self._ids)
        reply = await self._call(
            GetMapRequest(
                msg_id=msg_id, tenant=self.tenant, volume=self.volume, since_epoch=self.epoch
            ),
            msg_id,
        )
        assert isinstance(reply, GetMapReply)
        if not reply.changed or self._backend is None:
            self.epoch = max(self.epoch, reply.epoch)
            return

        def replica(sid: str) -> Replica:
            return Replica(sid, reply.servers[sid], reply.server_keys.get(sid))

        for slab, replica_ids, filling_ids in reply.slabs:
            if slab >= self._backend.slab_count:
                continue
            self._backend.set_replicas(
                slab,
                [replica(sid) for sid in replica_ids if sid in reply.servers],
                [replica(sid) for sid in filling_ids if sid in reply.servers],
                adopted=True,
            )
        self._backend.keep_only_servers(set(reply.servers))
        self.degraded = list(reply.degraded)
        self.epoch = reply.epoch
        self._backend.map_applied(reply.epoch)
        log.info(
            "applied slab map epoch=%d slabs=%d degraded=%d",
            reply.epoch,
            len(reply.slabs),
            len(reply.degraded),
        )

    async def _poll_map(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._refresh.wait(), self.poll_interval)
            self._refresh.clear()
            try:
                await self.refresh_map()
            except PlacementError as exc:
                log.debug("map poll failed: %s", exc)


def _time_out(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())

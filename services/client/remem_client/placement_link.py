"""The client's link to placement: slab allocation, the slab map by epoch, failure reports.

Placement is off the data path: it is asked once per slab (the first write), polled for map
changes once a second and at once after a replica failed, and told about failures. Its
answers are applied to the remote backend's slab map (`remote.slabmap`), so a replica
placement declared dead is never read again and a re-replicated slab's new replica gets
every later write.

The socket is a `dealer.Dealer` (ZMTP from the event loop when plaintext, libzmq for Curve),
its requests a `dealer.PendingRequests`: each request waits on a future that a reply or its
expiry timer resolves. A timer, not asyncio.wait_for: the NBD layer runs the remote
backend's requests without a Task (`task_free`), and from Python 3.12 wait_for needs one.
A lost connection (placement killed or restarted) fails the requests in flight at once, as
`unavailable`; requests sent until it is back wait for it (placement restarts quickly, and
a failure report is worth delivering late).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from remem_common.framing import encode
from remem_common.protocol.client_placement import (
    CLIENT_REPLY_ADAPTER,
    AllocateSlabReply,
    AllocateSlabRequest,
    ClientReply,
    GetMapReply,
    GetMapRequest,
    ReplicaRef,
    ReportFailureRequest,
)
from remem_common.protocol.envelope import ErrorCode, ErrorReply, Request
from remem_common.security import Security

from remem_client.dealer import DealerBusy, Link
from remem_client.remote.slabmap import Replica, SlabMap

if TYPE_CHECKING:
    import zmq

    from remem_client.metrics import MalformedReplies

log = logging.getLogger("client.placement")

# Requests queued toward a placement that does not take them (libzmq's default high-water
# mark, which this link had before it had a dealer of its own): past it a request fails at
# once, as `unavailable`.
SEND_HWM = 1000
# Seconds close() waits for the poll and report tasks once cancelled (they end at once).
CLOSE_TIMEOUT = 2.0


class PlacementLinkError(Exception):
    """Placement refused or did not answer."""

    def __init__(self, code: ErrorCode | str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


def _replicas(refs: list[ReplicaRef]) -> list[Replica]:
    return [Replica(ref.server_id, ref.endpoint, ref.public_key) for ref in refs]


class PlacementLink(Link[ClientReply]):
    """Implements `remote.slabmap.SlabPlacement` over placement's ROUTER."""

    peer = "placement"
    reply_adapter = CLIENT_REPLY_ADAPTER
    hwm = SEND_HWM

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
        name = f"placement {endpoint}"
        super().__init__(endpoint, context, timeout, malformed, security, server_key, name=name)
        self.tenant = tenant
        self.volume = volume
        self.replicas = replicas
        self.poll_interval = poll_interval
        self._dealer = self._open_dealer()
        self._closed = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._slabs: SlabMap | None = None
        self._refresh = asyncio.Event()
        self.epoch = 0
        self.degraded: list[int] = []

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self, slabs: SlabMap) -> None:
        """Adopt the map placement has now (so a restarted client serves the slabs it had)
        and begin polling it."""
        self._slabs = slabs
        try:
            await self.refresh_map()
        except PlacementLinkError as exc:
            log.warning("placement has no map for us yet: %s", exc)
        self._spawn(self._poll_map())

    async def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Stop polling and reporting, fail what waits for placement, close the socket.

        Waits at most `timeout` seconds for the background tasks to end: a task that
        outlives its cancellation is logged and left to the loop's end, never awaited.
        """
        # Closed first: a task that is not cancelled yet (or that got past a cancellation)
        # sends nothing more and leaves its loop.
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=timeout)
            for task in pending:
                log.warning(
                    "placement link: %s still running %.1fs after it was cancelled",
                    task.get_coro(),
                    timeout,
                )
        self._pending.fail_all(lambda: PlacementLinkError("closed", "placement link closed"))
        self._dealer.close()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- requests --------------------------------------------------------------------------

    async def _call(self, msg: Request) -> Any:
        """Send `msg` and return its reply; raises PlacementLinkError for an error reply, a
        timeout (code "timeout"), a full queue (unavailable) or a closed link."""
        if self._closed:
            raise PlacementLinkError("closed", "placement link closed")
        try:
            self._dealer.send(encode(msg))
        except DealerBusy as exc:
            raise PlacementLinkError(ErrorCode.UNAVAILABLE, f"cannot send: {exc}") from None
        future: asyncio.Future[Any] = self._loop.create_future()
        self._pending.add(msg.msg_id, future)
        try:
            reply = await future
        finally:
            self._pending.discard(msg.msg_id)  # a caller that gave up (cancelled)
        if isinstance(reply, ErrorReply):
            raise PlacementLinkError(reply.error_code, reply.detail)
        return reply

    def _expired(self, future: asyncio.Future[Any]) -> None:
        if not future.done():
            future.set_exception(
                PlacementLinkError("timeout", f"placement {self.endpoint} did not answer")
            )

    def _disconnected(self) -> None:
        """Placement's connection is lost: what was sent on it will never be answered."""
        self._pending.fail_all(
            lambda: PlacementLinkError(ErrorCode.UNAVAILABLE, "connection to placement lost")
        )

    def _on_reply(self, frames: list[Any]) -> None:
        taken = self._pending.take(frames)
        if taken is not None and not taken[2].done():
            taken[2].set_result(taken[0])

    async def allocate(self, slab: int) -> list[Replica]:
        """Replicas of `slab`; retried while placement is rebuilding after a restart."""
        for _ in range(30):
            try:
                reply = await self._call(
                    AllocateSlabRequest(
                        msg_id=self._next_id(),
                        tenant=self.tenant,
                        volume=self.volume,
                        slab=slab,
                        replicas=self.replicas,
                    )
                )
            except PlacementLinkError as exc:
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
            if self._slabs is not None and reply.filling:
                self._slabs.set_replicas(slab, _replicas(reply.replicas), _replicas(reply.filling))
            return _replicas(reply.replicas)
        raise PlacementLinkError(ErrorCode.UNAVAILABLE, "placement stayed unavailable")

    def report_failure(
        self, server_id: str, slab: int, detail: str, *, missed_write: bool = False
    ) -> None:
        """Tell placement (in the background) and re-read the map soon."""
        if self._closed:
            return  # shutting down: a failure seen now is the backend closing its links
        self._spawn(self._report(server_id, slab, detail, missed_write))

    async def _report(self, server_id: str, slab: int, detail: str, missed_write: bool) -> None:
        try:
            reply = await self._call(
                ReportFailureRequest(
                    msg_id=self._next_id(),
                    tenant=self.tenant,
                    volume=self.volume,
                    slab=slab,
                    server_id=server_id,
                    detail=detail[:512],
                    missed_write=missed_write,
                )
            )
            log.info("reported %s to placement: now %s", server_id, reply.server_state)
            if missed_write and self._slabs is not None:
                self._slabs.stale_reported(server_id, slab, reply.epoch)
        except PlacementLinkError as exc:
            log.warning("could not report %s to placement: %s", server_id, exc)
        self._refresh.set()

    # -- the map ---------------------------------------------------------------------------

    async def refresh_map(self) -> None:
        """Fetch the volume's map if it changed since the last one applied, and apply it."""
        reply = await self._call(
            GetMapRequest(
                msg_id=self._next_id(),
                tenant=self.tenant,
                volume=self.volume,
                since_epoch=self.epoch,
            )
        )
        assert isinstance(reply, GetMapReply)
        if not reply.changed or self._slabs is None:
            self.epoch = max(self.epoch, reply.epoch)
            return

        def replica(sid: str) -> Replica:
            return Replica(sid, reply.servers[sid], reply.server_keys.get(sid))

        for slab, replica_ids, filling_ids in reply.slabs:
            if slab >= self._slabs.slab_count:
                continue
            self._slabs.set_replicas(
                slab,
                [replica(sid) for sid in replica_ids if sid in reply.servers],
                [replica(sid) for sid in filling_ids if sid in reply.servers],
                adopted=True,
            )
        self._slabs.keep_only_servers(set(reply.servers))
        self.degraded = list(reply.degraded)
        self.epoch = reply.epoch
        self._slabs.map_applied(reply.epoch)
        log.info(
            "applied slab map epoch=%d slabs=%d degraded=%d",
            reply.epoch,
            len(reply.slabs),
            len(reply.degraded),
        )

    async def _poll_map(self) -> None:
        while not self._closed:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for returns normally when
            # it is cancelled just as the event it waits for is set (a report's reply had
            # set it), so the task never ended and close() waited for it forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_interval):
                    await self._refresh.wait()
            self._refresh.clear()
            try:
                await self.refresh_map()
            except PlacementLinkError as exc:
                log.debug("map poll failed: %s", exc)

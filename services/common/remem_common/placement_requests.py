"""Blocking requests to placement, one at a time, for tools (`remem status`, `remem drain`,
`remem up`, a page server's tools) and tests.

Each call sends one request over a DEALER and waits for its reply with a timeout; an
`error_reply` raises `PlacementRequestError` with the error code. The NBD client does not use
this: its own asynchronous link to placement is `remem_client.placement_link.PlacementLink`.
"""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, Field, TypeAdapter

from remem_common.dealer import BlockingDealer, RefusedRequest
from remem_common.framing import decode, encode
from remem_common.protocol.admin_placement import (
    DrainServerReply,
    DrainServerRequest,
    GetStatusReply,
    GetStatusRequest,
)
from remem_common.protocol.client_placement import (
    AllocateSlabReply,
    AllocateSlabRequest,
    GetMapReply,
    GetMapRequest,
    ReportFailureReply,
    ReportFailureRequest,
)
from remem_common.protocol.envelope import ErrorCode, ErrorReply

PlacementReply = Annotated[
    AllocateSlabReply
    | GetMapReply
    | ReportFailureReply
    | GetStatusReply
    | DrainServerReply
    | ErrorReply,
    Field(discriminator="type"),
]
PLACEMENT_REPLY_ADAPTER: TypeAdapter[PlacementReply] = TypeAdapter(PlacementReply)
ReplyT = TypeVar("ReplyT", bound=BaseModel)


class PlacementRequestError(RefusedRequest):
    """Placement answered with an error reply."""


class PlacementRequestTimeout(Exception):
    """No reply within the timeout."""


class BlockingPlacementClient(BlockingDealer):
    """Blocking requests to placement over one DEALER socket."""

    default_timeout = 5.0

    def call(self, msg: BaseModel, expect: type[ReplyT], timeout: float | None = None) -> ReplyT:
        """Send `msg`, return its reply of type `expect` (stale replies are skipped)."""
        self.socket.send_multipart(encode(msg))
        wait_ms = int((self.timeout if timeout is None else timeout) * 1000)
        msg_id: Any = getattr(msg, "msg_id", None)
        while True:
            if not self.socket.poll(wait_ms):
                raise PlacementRequestTimeout(f"no reply from placement at {self.endpoint}")
            reply, _ = decode(self.socket.recv_multipart(), PLACEMENT_REPLY_ADAPTER)
            if reply.parent_id != msg_id:
                continue  # the answer to an earlier request that timed out
            if isinstance(reply, ErrorReply):
                raise PlacementRequestError(reply.error_code, reply.detail)
            if not isinstance(reply, expect):
                raise PlacementRequestError(ErrorCode.MALFORMED, f"unexpected reply {reply.type}")
            return reply

    def allocate(
        self,
        tenant: str,
        volume: int,
        slab: int,
        replicas: int = 2,
        known_replicas: list[str] | None = None,
    ) -> AllocateSlabReply:
        return self.call(
            AllocateSlabRequest(
                msg_id=self.next_id(),
                tenant=tenant,
                volume=volume,
                slab=slab,
                replicas=replicas,
                known_replicas=known_replicas or [],
            ),
            AllocateSlabReply,
        )

    def get_map(self, tenant: str, volume: int, since_epoch: int = 0) -> GetMapReply:
        return self.call(
            GetMapRequest(
                msg_id=self.next_id(), tenant=tenant, volume=volume, since_epoch=since_epoch
            ),
            GetMapReply,
        )

    def report_failure(
        self, tenant: str, volume: int, slab: int, server_id: str, detail: str = ""
    ) -> ReportFailureReply:
        return self.call(
            ReportFailureRequest(
                msg_id=self.next_id(),
                tenant=tenant,
                volume=volume,
                slab=slab,
                server_id=server_id,
                detail=detail,
            ),
            ReportFailureReply,
        )

    def status(self) -> GetStatusReply:
        return self.call(GetStatusRequest(msg_id=self.next_id()), GetStatusReply)

    def drain(self, server_id: str, *, cancel: bool = False) -> DrainServerReply:
        return self.call(
            DrainServerRequest(msg_id=self.next_id(), server_id=server_id, cancel=cancel),
            DrainServerReply,
        )

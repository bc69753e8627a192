"""Blocking requests to placement, one at a time, for tools (`remem status`, `remem drain`,
`remem up`, a page server's tools) and tests.

Each call sends one request over a DEALER and waits for its reply with a timeout; an
`error_reply` raises `PlacementRequestError` with the error code. The NBD client does not use
this: its own asynchronous link to placement is `remem_client.placement_link.PlacementLink`.
"""

from __future__ import annotations

from typing import Annotated, TypeVar

from pydantic import BaseModel, Field, TypeAdapter

from remem_common.dealer import RefusedRequest, RequestDealer
from remem_common.protocol.admin_placement import (
    AdminReplies,
    DrainServerReply,
    DrainServerRequest,
    GetStatusReply,
    GetStatusRequest,
)
from remem_common.protocol.client_placement import (
    AllocateSlabReply,
    AllocateSlabRequest,
    ClientReplies,
    GetMapReply,
    GetMapRequest,
    ReportFailureReply,
    ReportFailureRequest,
)
from remem_common.protocol.envelope import ErrorCode, ErrorReply

# Tools ask placement both as a client and as an admin.
PlacementReply = Annotated[ClientReplies | AdminReplies | ErrorReply, Field(discriminator="type")]
PLACEMENT_REPLY_ADAPTER: TypeAdapter[PlacementReply] = TypeAdapter(PlacementReply)
ReplyT = TypeVar("ReplyT", bound=BaseModel)


class PlacementRequestError(RefusedRequest):
    """Placement answered with an error reply."""


class PlacementRequestTimeout(Exception):
    """No reply within the timeout."""


class BlockingPlacementClient(RequestDealer):
    """Blocking requests to placement over one DEALER socket."""

    default_timeout = 5.0
    reply_adapter = PLACEMENT_REPLY_ADAPTER
    refused_type = PlacementRequestError

    def timeout_error(self, detail: str) -> Exception:
        return PlacementRequestTimeout(f"placement: {detail}")

    def ask(self, msg: BaseModel, expect: type[ReplyT], timeout: float | None = None) -> ReplyT:
        """Send `msg`, return its reply, which must be of type `expect`."""
        reply, _ = self.call(msg, timeout=timeout)
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
        return self.ask(
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
        return self.ask(
            GetMapRequest(
                msg_id=self.next_id(), tenant=tenant, volume=volume, since_epoch=since_epoch
            ),
            GetMapReply,
        )

    def report_failure(
        self, tenant: str, volume: int, slab: int, server_id: str, detail: str = ""
    ) -> ReportFailureReply:
        return self.ask(
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
        return self.ask(GetStatusRequest(msg_id=self.next_id()), GetStatusReply)

    def drain(self, server_id: str, *, cancel: bool = False) -> DrainServerReply:
        return self.ask(
            DrainServerRequest(msg_id=self.next_id(), server_id=server_id, cancel=cancel),
            DrainServerReply,
        )

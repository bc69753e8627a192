"""Admin tools -> placement: cluster status and draining a page server (protocol version 1).

Sockets
-------
`remem status` and `remem drain` connect a DEALER to placement's ROUTER (the same `--listen`
endpoint page servers and clients use) and send `[b"", header]`; no payload frames.

Messages
--------
| request               | reply                |
|-----------------------|----------------------|
| get_status_request    | get_status_reply     |
| drain_server_request  | drain_server_reply   |

get_status_request
    Every page server placement knows (id, zone, state, endpoint, used/capacity bytes as
    placement estimates them, slabs it holds, pressure and drain flags), every degraded slab
    (fewer replicas than its target), every slab push in flight, and totals. A server's
    `state` is one of `live`, `suspect`, `dead`, `draining` (an operator asked), `pressure`
    (its host needs the memory back). `utilization_from` says whether its used bytes come from
    a metrics sample yet (`metrics`) or only from its registration (`register`).

drain_server_request(server_id, cancel=False)
    Mark the server draining: it gets no new slabs, and every slab it holds is copied to
    another server (page server to page server, as re-replication) and then dropped from it.
    The reply counts the slabs still to move; progress is read with `get_status_request`
    (the server's `slabs` falls to 0). `cancel` ends the drain (slabs already moved stay
    moved). Draining an unknown server is `not_found`.

A push in flight is first waiting (`copying` false) until a client of the volume has polled
the map that lists the target as filling (or `--map-settle` passed) and one of placement's
`--max-pushes` copying slots is free, then copying.

Security (Curve, see `remem_common.security`): both requests need a key of role admin
(`remem keys --role admin`); any other key is answered `forbidden`.

Errors: `error_reply` with `forbidden`, `malformed`, `unknown_type`, `unsupported_version`,
`not_found`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, TypeAdapter

from remem_common.protocol.client_pageserver import SlabRef
from remem_common.protocol.envelope import Reply, Request
from remem_common.protocol.pageserver_placement import Endpoint, MemoryUsage, ServerId, Zone

ServerState = Literal["live", "suspect", "dead", "draining", "pressure"]
SERVER_STATES: tuple[ServerState, ...] = ("live", "suspect", "dead", "draining", "pressure")


class ServerStatus(MemoryUsage):
    server_id: ServerId
    zone: Zone
    state: ServerState
    endpoint: Endpoint
    slabs: int = Field(ge=0)
    under_pressure: bool
    draining: bool
    utilization_from: Literal["register", "metrics"]


class SlabStatus(SlabRef):
    target: int = Field(ge=1)
    replicas: list[ServerId]
    filling: list[ServerId]


class PushStatus(SlabRef):
    source: ServerId
    target: ServerId
    reason: Literal["repair", "drain", "pressure"]
    seconds: float = Field(ge=0)
    copying: bool  # False: waiting for the volume's clients to apply the map, or for a slot


class GetStatusRequest(Request):
    type: Literal["get_status_request"] = "get_status_request"


class GetStatusReply(Reply):
    type: Literal["get_status_reply"] = "get_status_reply"
    epoch: int = Field(ge=0)
    in_grace: bool
    slabs_total: int = Field(ge=0)
    servers: list[ServerStatus]
    degraded: list[SlabStatus]
    pushes: list[PushStatus]
    pushes_done: int = Field(ge=0)
    pushes_failed: int = Field(ge=0)
    rereplicated_bytes: int = Field(ge=0)


class DrainServerRequest(Request):
    type: Literal["drain_server_request"] = "drain_server_request"
    server_id: ServerId
    cancel: bool = False


class DrainServerReply(Reply):
    type: Literal["drain_server_reply"] = "drain_server_reply"
    server_id: ServerId
    draining: bool
    slabs_left: int = Field(ge=0)


AdminRequest = Annotated[GetStatusRequest | DrainServerRequest, Field(discriminator="type")]
ADMIN_REQUEST_ADAPTER: TypeAdapter[AdminRequest] = TypeAdapter(AdminRequest)
# The replies, for the unions of the clients that send these requests.
AdminReplies = GetStatusReply | DrainServerReply

__all__ = [
    "ADMIN_REQUEST_ADAPTER",
    "SERVER_STATES",
    "AdminReplies",
    "DrainServerReply",
    "DrainServerRequest",
    "Endpoint",
    "GetStatusReply",
    "GetStatusRequest",
    "PushStatus",
    "ServerStatus",
    "SlabStatus",
]

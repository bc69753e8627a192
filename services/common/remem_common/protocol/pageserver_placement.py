"""Page server <-> placement: registration, heartbeats and slab orders (protocol version 1).

Sockets
-------
- Placement binds a ROUTER (`--listen` of `remem placement`). A page server connects a DEALER
  and sends `register_server_request` at start, then `heartbeat_request` every
  `heartbeat_interval` seconds (from the register reply). Placement answers each.
- Placement reaches a page server's own ROUTER (its data endpoint) with a DEALER to give
  slab orders. A page server answers `push_slab_request` only when the push is finished.

Messages
--------
| request                     | sender     | reply                       |
|-----------------------------|------------|-----------------------------|
| register_server_request     | pageserver | register_server_reply       |
| heartbeat_request           | pageserver | heartbeat_reply             |
| list_inventory_request      | placement  | list_inventory_reply        |
| drop_slab_request           | placement  | drop_slab_reply             |
| push_slab_request           | placement  | push_slab_reply (when done) |

`push_slab_request` orders the page server to copy every page it holds of one slab straight
to `target_endpoint` (another page server) with `pageserver_peer` messages: the data moves
A -> B and never passes through placement. The target keeps a page it already has (a client
writes to a push target too, and its write is newer), so placement first orders the target
to `drop_slab_request` the slab, and lists it as a target for clients only once it answered:
no page of an older copy can survive there. The reply counts pages and bytes sent, or is an
`error_reply` with `unavailable` if the target did not answer in time.

Endpoints (`data_endpoint`, `target_endpoint`) must be connectable ZeroMQ addresses:
`tcp://HOST:PORT` with a port 1..65535 and no wildcard, `ipc://PATH` or `inproc://NAME`; any
other value is `malformed` (a DEALER's connect refuses it, so it could never be served).
Security (Curve, see `remem_common.security`): a page server registers the public key of its
data endpoint (`public_key`, which must be the key it authenticates with; placement answers
`forbidden` otherwise), placement connects to it and hands the key to clients and to pushing
peers (`target_public_key`). Registration and heartbeats need a key of role pageserver; slab
orders (inventory, drop, push) one of role placement; anything else is `forbidden`.

No payload frames on this boundary. Errors: `error_reply` (see `envelope`).
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter

from remem_common.protocol.client_pageserver import SlabRef
from remem_common.protocol.envelope import ErrorReply, Reply, Request

ServerId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")]
_TCP_ENDPOINT = re.compile(
    r"^tcp://(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_][A-Za-z0-9._-]*):([0-9]{1,5})$"
)


def _connectable(endpoint: str) -> str:
    """Refuse a tcp endpoint a DEALER cannot connect to (no port, a wildcard, port 0)."""
    if endpoint.startswith("tcp://"):
        match = _TCP_ENDPOINT.match(endpoint)
        if match is None or not 0 < int(match.group(1)) < 65536:
            raise ValueError("a tcp endpoint is tcp://HOST:PORT with a port 1..65535")
    return endpoint


Endpoint = Annotated[
    str, Field(pattern=r"^(tcp|ipc|inproc)://\S{1,250}$"), AfterValidator(_connectable)
]
Zone = Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,63}$")]
# A z85-encoded CurveZMQ public key (40 characters); see `remem_common.security`.
CurveKey = Annotated[str, Field(pattern=r"^[0-9A-Za-z.:+=^!/*?&<>()\[\]{}@%$#-]{40}$")]


class MemoryUsage(BaseModel):
    """A page server's RAM for pages: what it donates and what its pages take (a mixin, as
    `client_pageserver.VolumeRef`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    capacity_bytes: int = Field(ge=0)
    used_bytes: int = Field(ge=0)


class RegisterServerRequest(MemoryUsage, Request):
    """A page server announces itself (again after any restart of either side)."""

    type: Literal["register_server_request"] = "register_server_request"
    server_id: ServerId
    data_endpoint: Endpoint
    metrics_url: str = Field(max_length=256)
    zone: Zone
    started_at: float
    public_key: CurveKey | None = None  # with Curve: the key of its data endpoint


class RegisterServerReply(Reply):
    type: Literal["register_server_reply"] = "register_server_reply"
    heartbeat_interval: float = Field(gt=0)


class HeartbeatRequest(MemoryUsage, Request):
    """I am alive; `under_pressure` asks placement to move slabs off (host needs its RAM)."""

    type: Literal["heartbeat_request"] = "heartbeat_request"
    server_id: ServerId
    under_pressure: bool = False


class HeartbeatReply(Reply):
    """`registered` False means placement does not know this server: register again."""

    type: Literal["heartbeat_reply"] = "heartbeat_reply"
    registered: bool = True


class SlabInventory(SlabRef):
    """One slab a page server holds."""

    pages: int = Field(ge=0)


class ListInventoryRequest(Request):
    type: Literal["list_inventory_request"] = "list_inventory_request"


class ListInventoryReply(Reply):
    type: Literal["list_inventory_reply"] = "list_inventory_reply"
    server_id: ServerId
    slabs: list[SlabInventory]


class DropSlabRequest(SlabRef, Request):
    type: Literal["drop_slab_request"] = "drop_slab_request"


class DropSlabReply(Reply):
    type: Literal["drop_slab_reply"] = "drop_slab_reply"
    dropped: int = Field(ge=0)


class PushSlabRequest(SlabRef, Request):
    """Copy one slab to another page server directly (re-replication, drain)."""

    type: Literal["push_slab_request"] = "push_slab_request"
    target_endpoint: Endpoint
    target_public_key: CurveKey | None = None  # with Curve: the target's server key
    timeout: float = Field(default=10.0, gt=0, le=600)


class PushSlabReply(Reply):
    type: Literal["push_slab_reply"] = "push_slab_reply"
    pages: int = Field(ge=0)
    bytes: int = Field(ge=0)
    seconds: float = Field(ge=0)
    corrupt: int = Field(default=0, ge=0)  # pages skipped: checksum mismatch at the source


SlabOrder = Annotated[
    ListInventoryRequest | DropSlabRequest | PushSlabRequest, Field(discriminator="type")
]
SLAB_ORDER_ADAPTER: TypeAdapter[SlabOrder] = TypeAdapter(SlabOrder)

# The replies to slab orders, for the unions of the clients that send them.
SlabOrderReplies = ListInventoryReply | DropSlabReply | PushSlabReply
SlabOrderReply = Annotated[SlabOrderReplies | ErrorReply, Field(discriminator="type")]
SLAB_ORDER_REPLY_ADAPTER: TypeAdapter[SlabOrderReply] = TypeAdapter(SlabOrderReply)

ControlRequest = Annotated[RegisterServerRequest | HeartbeatRequest, Field(discriminator="type")]
CONTROL_REQUEST_ADAPTER: TypeAdapter[ControlRequest] = TypeAdapter(ControlRequest)

ControlReply = Annotated[
    RegisterServerReply | HeartbeatReply | ErrorReply, Field(discriminator="type")
]
CONTROL_REPLY_ADAPTER: TypeAdapter[ControlReply] = TypeAdapter(ControlReply)

"""Client <-> placement: slab allocation, the slab map and failure reports (protocol version 1).

Sockets
-------
- Placement binds one ROUTER (`--listen` of `remem placement`, default tcp://127.0.0.1:7000),
  shared with page servers (`pageserver_placement`) and admin tools (`admin_placement`). A
  client connects a DEALER and sends `[b"", header]`; no message on this boundary has
  payload frames. Placement never carries page data: clients talk to page servers directly.
- Optionally placement also binds a PUB socket (`--publish`). On every change of a volume's
  map it publishes two frames: topic `map <tenant> <volume> ` (note the trailing space, so
  that subscribing to volume 1 does not match volume 10) and a `map_changed_notice` header.
  PUB is lossy by design: a client must still poll `get_map_request` (e.g. once a second and
  whenever a replica fails), the notice only makes it learn sooner.

Messages
--------
| request                 | reply                  |
|-------------------------|------------------------|
| allocate_slab_request   | allocate_slab_reply    |
| get_map_request         | get_map_reply          |
| report_failure_request  | report_failure_reply   |

allocate_slab_request(tenant, volume, slab, replicas=k)
    Placement picks k distinct live page servers with the most free memory (never a full one
    or one under memory pressure), in k distinct zones when there are k zones. The answer is
    idempotent: asking again for a slab already placed returns its current replicas (asking
    with a larger k raises the slab's target and placement adds replicas in the background).
    With fewer than k eligible servers the reply has fewer replicas and `degraded` true;
    with none it is an `error_reply` `no_space`. `known_replicas` lets a client re-announce
    a slab it held before placement restarted (placement's state is soft); placement adopts
    those of them that are registered if it does not know the slab.

Replica sets: `replicas` hold the slab's pages and may be read; `filling` are servers a slab
push is copying to right now. A client writes every page to replicas + filling and reads only
from replicas. When the push ends, the filling server moves to `replicas` (a new epoch).

get_map_request(tenant, volume, since_epoch)
    `epoch` is placement's map version, increasing with every change of any volume; a
    restarted placement starts above every epoch it issued before (its first epoch is its
    start time in microseconds). If the volume changed after `since_epoch` the reply has
    `changed` true and the whole map of the volume: `servers` {server_id: endpoint} and
    `slabs`, compact rows `[slab, [replica ids], [filling ids]]`, plus the `degraded` slab
    numbers; otherwise `changed` is false and both are empty. A client keeps the epoch of the
    last map it applied and passes it back.

    `since_epoch` is also an acknowledgement: placement starts copying a slab to a new
    (filling) replica only once a client of the volume has polled with a `since_epoch` at or
    after the epoch that first listed it (or after placement's `--map-settle` seconds), so no
    write reaches the old replicas without also reaching the new one. Clients should therefore
    poll promptly after a `map_changed_notice` and at least every second.

report_failure_request(tenant, volume, slab, server_id, detail, missed_write=false)
    A client could not read or write a replica. Placement marks the server suspect (no new
    slabs), probes it, and declares it dead if the probe is not answered in time (or when
    heartbeats stop), which removes it from every map. The reply says the server's state now
    and the current epoch; the client should stop using that replica at once and re-read the
    map, so it never reads from a dead server twice.

    `missed_write` true says more: a write of this slab that another replica stored did not
    reach this server (it failed, timed out, or was not sent because the server was failing),
    so its copy of the slab is stale even if the server itself recovers. Placement removes
    the server from the slab's replicas (or abandons the push filling it), a new epoch, tells
    the server to drop its copy, and re-replicates the slab from the others. The client
    reads that slab from the other replicas meanwhile. Ignored when the server is the slab's
    last replica: a stale copy is then all there is.

Security (Curve, see `remem_common.security`): each replica's `public_key` (and the map's
`server_keys`) is the page server's Curve key, which a client needs to connect to it. A client
key may only allocate, map and report slabs of its own tenant: any other tenant is answered
`forbidden`.

Errors: `error_reply` (see `envelope`) with `forbidden`, `malformed`, `unknown_type`,
`unsupported_version`, `no_space` (no eligible page server), `unavailable` (placement is
still rebuilding its map after a restart: retry after `restart_grace`), `not_found` (report
about an unknown server).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from remem_common.protocol.client_pageserver import SlabId, SlabRef, VolumeRef
from remem_common.protocol.envelope import ErrorReply, Reply, Request
from remem_common.protocol.pageserver_placement import CurveKey, Endpoint, ServerId

MAX_REPLICAS = 8

# [slab, [replica server ids], [filling server ids]]
SlabRow = tuple[SlabId, list[ServerId], list[ServerId]]


class ReplicaRef(BaseModel):
    """Where one replica of a slab lives."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    server_id: ServerId
    endpoint: Endpoint
    public_key: CurveKey | None = None  # with Curve: the page server's public key


class AllocateSlabRequest(SlabRef, Request):
    """Place a slab on `replicas` page servers (or answer where it already is)."""

    type: Literal["allocate_slab_request"] = "allocate_slab_request"
    replicas: int = Field(default=2, ge=1, le=MAX_REPLICAS)
    known_replicas: list[ServerId] = Field(default_factory=list, max_length=MAX_REPLICAS)


class AllocateSlabReply(SlabRef, Reply):
    type: Literal["allocate_slab_reply"] = "allocate_slab_reply"
    replicas: list[ReplicaRef]
    filling: list[ReplicaRef] = Field(default_factory=list)
    degraded: bool
    epoch: int = Field(ge=0)


class GetMapRequest(VolumeRef, Request):
    """The slab map of one volume, if it changed after `since_epoch`."""

    type: Literal["get_map_request"] = "get_map_request"
    since_epoch: int = Field(default=0, ge=0)


class GetMapReply(VolumeRef, Reply):
    type: Literal["get_map_reply"] = "get_map_reply"
    epoch: int = Field(ge=0)
    changed: bool
    servers: dict[ServerId, Endpoint] = Field(default_factory=dict)
    server_keys: dict[ServerId, CurveKey] = Field(default_factory=dict)
    slabs: list[SlabRow] = Field(default_factory=list)
    degraded: list[SlabId] = Field(default_factory=list)


class ReportFailureRequest(SlabRef, Request):
    """A replica failed a client's request (timeout, error, bad checksum)."""

    type: Literal["report_failure_request"] = "report_failure_request"
    server_id: ServerId
    detail: str = Field(default="", max_length=512)
    missed_write: bool = False


class ReportFailureReply(Reply):
    type: Literal["report_failure_reply"] = "report_failure_reply"
    server_state: Literal["live", "suspect", "dead"]
    epoch: int = Field(ge=0)


class MapChangedNotice(VolumeRef):
    """Published on the PUB socket (not a request): the volume's map is now at `epoch`."""

    type: Literal["map_changed_notice"] = "map_changed_notice"
    version: Literal[1] = 1
    epoch: int = Field(ge=0)


def map_topic(tenant: str, volume: int) -> bytes:
    """The PUB topic of one volume's map changes (trailing space: no prefix collisions)."""
    return f"map {tenant} {volume} ".encode()


ClientRequest = Annotated[
    AllocateSlabRequest | GetMapRequest | ReportFailureRequest, Field(discriminator="type")
]
CLIENT_REQUEST_ADAPTER: TypeAdapter[ClientRequest] = TypeAdapter(ClientRequest)

# The replies, for the unions of the clients that send these requests.
ClientReplies = AllocateSlabReply | GetMapReply | ReportFailureReply
ClientReply = Annotated[ClientReplies | ErrorReply, Field(discriminator="type")]
CLIENT_REPLY_ADAPTER: TypeAdapter[ClientReply] = TypeAdapter(ClientReply)

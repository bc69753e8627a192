"""Client -> page server: the data plane (protocol version 1).

Sockets
-------
The page server binds one ROUTER (`--listen`). A client connects a DEALER and may keep many
requests in flight; replies come back in any order and are matched by `parent_id`. A client
sends `[b"", header, payload...]`; the ROUTER adds the routing id.

Messages and their payload frames (codecs in `protocol.pages`)
-----------------------------------------------------------
| request              | payload frames            | reply                            |
|----------------------|---------------------------|----------------------------------|
| put_pages_request    | keys, checksums, data     | put_pages_reply                  |
| get_pages_request    | keys                      | get_pages_reply + found, checksums, data |
| delete_pages_request | keys                      | delete_pages_reply               |

Every request names `tenant`, `volume` and `count` (1..1024 pages). Keys are
(slab u32, page u32) pairs; a page index is < 16384 (a slab is 64 MiB); one batch may span
slabs but holds each page once.

- PUT stores every page or none: if the batch needs more free pages than the server has, the
  reply is `no_space` and nothing changes (nothing is ever evicted to make room). A page whose
  CRC-32C does not match its checksum fails the whole batch with `bad_checksum`.
- GET answers with `found` (N x u8: 1 stored, 0 absent), the stored checksums (0 where
  absent) and N x 4096 bytes (zeros where absent). The reader verifies checksums itself.
- DELETE (trim) frees the pages; absent pages are not an error. The reply counts the freed.

Pages belong to their tenant: a key is only ever looked up under the request's tenant, so no
request reaches another tenant's pages. With Curve (see `remem_common.security`) the tenant is
bound to the sender's key: a PUT, GET or DELETE whose `tenant` differs from the tenant of the
client key that sent it, or sent by a key that is not a client's, is answered `forbidden` and
changes nothing. Without a known key the handshake never completes: no reply at all.

Errors: `error_reply` with `forbidden`, `malformed` (bad frames, counts, lengths), `unknown_type`,
`unsupported_version`, `no_space`, `bad_checksum`, `shutting_down`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, TypeAdapter

from remem_common.protocol.envelope import Reply, Request
from remem_common.protocol.pages import MAX_BATCH_PAGES

# Tenant names go into the page server's arena file and metric-free logs: keep them short
# and plain.
TENANT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
Tenant = Annotated[str, Field(pattern=TENANT_PATTERN)]
VolumeId = Annotated[int, Field(ge=0, lt=2**32)]
SlabId = Annotated[int, Field(ge=0, lt=2**32)]
PageCount = Annotated[int, Field(ge=1, le=MAX_BATCH_PAGES)]


class PutPagesRequest(Request):
    """Store `count` pages. Payload: keys, checksums, data."""

    type: Literal["put_pages_request"] = "put_pages_request"
    tenant: Tenant
    volume: VolumeId
    count: PageCount


class PutPagesReply(Reply):
    type: Literal["put_pages_reply"] = "put_pages_reply"
    stored: int = Field(ge=0)


class GetPagesRequest(Request):
    """Read `count` pages. Payload: keys."""

    type: Literal["get_pages_request"] = "get_pages_request"
    tenant: Tenant
    volume: VolumeId
    count: PageCount


class GetPagesReply(Reply):
    """Payload: found (u8 each), checksums (u32 each), data (4096 bytes each)."""

    type: Literal["get_pages_reply"] = "get_pages_reply"
    count: int = Field(ge=0)


class DeletePagesRequest(Request):
    """Free `count` pages (trim). Payload: keys."""

    type: Literal["delete_pages_request"] = "delete_pages_request"
    tenant: Tenant
    volume: VolumeId
    count: PageCount


class DeletePagesReply(Reply):
    type: Literal["delete_pages_reply"] = "delete_pages_reply"
    deleted: int = Field(ge=0)


DataRequest = Annotated[
    PutPagesRequest | GetPagesRequest | DeletePagesRequest, Field(discriminator="type")
]
DATA_REQUEST_ADAPTER: TypeAdapter[DataRequest] = TypeAdapter(DataRequest)

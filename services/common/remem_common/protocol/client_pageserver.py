"""Client -> page server: the data plane (protocol version 1).

Sockets
-------
The page server binds one ROUTER (`--listen`). A client connects a DEALER and may keep many
requests in flight; replies come back in any order and are matched by `parent_id`. A client
sends `[b"", header, payload...]`; the ROUTER adds the routing id.

Messages and their payload frames (codecs in `protocol.pages`)
-----------------------------------------------------------
| request              | payload frames               | reply                                  |
|----------------------|------------------------------|----------------------------------------|
| put_pages_request    | keys, checksums, data, seals | put_pages_reply                        |
| get_pages_request    | keys                         | get_pages_reply + found, checksums,    |
|                      |                              | data, seals                            |
| delete_pages_request | keys                         | delete_pages_reply                     |

Every request names `tenant`, `volume` and `count` (1..1024 pages). Keys are
(slab u32, page u32) pairs; a page index is < 16384 (a slab is 64 MiB); one batch may span
slabs but holds each page once.

- PUT stores every page or none: if the batch needs more free pages than the server has, the
  reply is `no_space` and nothing changes (nothing is ever evicted to make room). A page whose
  CRC-32C does not match its checksum fails the whole batch with `bad_checksum`.
- GET answers with `found` (N x u8: 1 stored, 0 absent), the stored checksums (0 where
  absent), N x 4096 bytes (zeros where absent) and the stored seals (zeros where absent).
  The reader verifies checksums itself.
- Seals (N x 28 bytes: AES-GCM nonce and tag, `protocol.pages.SEAL_BYTES`) are the
  client's: the page server stores each beside its page and returns it unread. The client
  encrypts every page before it leaves its host and authenticates it on the way back, so
  a page server holds only ciphertext; its checksums are over the bytes it holds (the
  ciphertext), so it still detects its own corruption without the key. The seals frame is
  new since arena format 2: a 3-frame PUT (an older client) is refused as `malformed`.
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

import json
import re
import time
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from remem_common.protocol.envelope import PROTOCOL_VERSION, Reply, Request, ok_reply_parser
from remem_common.protocol.pages import MAX_BATCH_PAGES

# Tenant names go into the page server's arena file and metric-free logs: keep them short
# and plain.
TENANT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
Tenant = Annotated[str, Field(pattern=TENANT_PATTERN)]
VolumeId = Annotated[int, Field(ge=0, lt=2**32)]
SlabId = Annotated[int, Field(ge=0, lt=2**32)]
PageCount = Annotated[int, Field(ge=1, le=MAX_BATCH_PAGES)]


class VolumeRef(BaseModel):
    """The fields that name one volume of one tenant, shared by every message and row about
    it (a mixin: `class GetMapRequest(VolumeRef, Request)`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tenant: Tenant
    volume: VolumeId


class SlabRef(VolumeRef):
    """The fields that name one slab of a volume."""

    slab: SlabId


class PagesRequest(VolumeRef, Request):
    """Base of the data-plane requests: `count` pages of one volume, keys in the payload."""

    count: PageCount


class PutPagesRequest(PagesRequest):
    """Store `count` pages. Payload: keys, checksums, data, seals."""

    type: Literal["put_pages_request"] = "put_pages_request"


class PutPagesReply(Reply):
    type: Literal["put_pages_reply"] = "put_pages_reply"
    stored: int = Field(ge=0)


class GetPagesRequest(PagesRequest):
    """Read `count` pages. Payload: keys."""

    type: Literal["get_pages_request"] = "get_pages_request"


class GetPagesReply(Reply):
    """Payload: found (u8 each), checksums (u32 each), data (4096 bytes each), seals (28
    bytes each)."""

    type: Literal["get_pages_reply"] = "get_pages_reply"
    count: int = Field(ge=0)


class DeletePagesRequest(PagesRequest):
    """Free `count` pages (trim). Payload: keys."""

    type: Literal["delete_pages_request"] = "delete_pages_request"


class DeletePagesReply(Reply):
    type: Literal["delete_pages_reply"] = "delete_pages_reply"
    deleted: int = Field(ge=0)


DataRequest = Annotated[
    PutPagesRequest | GetPagesRequest | DeletePagesRequest, Field(discriminator="type")
]
DATA_REQUEST_ADAPTER: TypeAdapter[DataRequest] = TypeAdapter(DataRequest)
# The replies, for the unions of the clients that send these requests.
DataReply = PutPagesReply | GetPagesReply | DeletePagesReply


# -- hot-path header encoders --------------------------------------------------------------
# The data plane sends these headers thousands of times a second; building and dumping a
# pydantic model costs ~10 us each time. Each function writes exactly what its model's
# `model_dump_json` writes (tests/unit/test_protocol.py checks both parse to equal models),
# so the models above stay the one definition of the wire.


def page_request_header(type_name: str, msg_id: int, tenant: str, volume: int, count: int) -> bytes:
    """Header of a put/get/delete_pages_request; `tenant` must already be valid."""
    return (
        f'{{"version":{PROTOCOL_VERSION},"msg_id":{msg_id},"sent_at":{time.time()!r},'
        f'"type":"{type_name}","tenant":{json.dumps(tenant)},"volume":{volume},"count":{count}}}'
    ).encode()


def page_request_header_encoder(
    type_name: str, tenant: str, volume: int
) -> Callable[[int, int], bytes]:
    """`page_request_header` of one type, tenant and volume as `(msg_id, count) -> header`,
    with what is the same in every request of a link formatted once."""
    head = f'{{"version":{PROTOCOL_VERSION},"msg_id":'
    tail = f',"type":"{type_name}","tenant":{json.dumps(tenant)},"volume":{volume},"count":'
    now = time.time

    def header(msg_id: int, count: int) -> bytes:
        return f'{head}{msg_id},"sent_at":{now()!r}{tail}{count}}}'.encode()

    return header


# The page server's replies give `sent_at` to the microsecond from integers: a float's repr
# is most of an encoder's time, and more with the cold caches of a server woken for one
# request.
_GET_PAGES_REPLY_FORMAT = (
    b'{"version":%d,"msg_id":0,"sent_at":%d.%06d,'
    b'"parent_id":%d,"status":"ok","type":"get_pages_reply","count":%d}'
)
_PUT_PAGES_REPLY_FORMAT = (
    b'{"version":%d,"msg_id":0,"sent_at":%d.%06d,'
    b'"parent_id":%d,"status":"ok","type":"put_pages_reply","stored":%d}'
)


def get_pages_reply_header(parent_id: int, count: int) -> bytes:
    """Header of a get_pages_reply to request `parent_id`."""
    seconds, micros = divmod(time.time_ns() // 1000, 1_000_000)
    return _GET_PAGES_REPLY_FORMAT % (PROTOCOL_VERSION, seconds, micros, parent_id, count)


def put_pages_reply_header(parent_id: int, stored: int) -> bytes:
    """Header of a put_pages_reply to request `parent_id`."""
    seconds, micros = divmod(time.time_ns() // 1000, 1_000_000)
    return _PUT_PAGES_REPLY_FORMAT % (PROTOCOL_VERSION, seconds, micros, parent_id, stored)


# `get_pages_reply_header`'s and `put_pages_reply_header`'s forms, read back by the client.
parse_get_pages_reply = ok_reply_parser("get_pages_reply", "count")
parse_put_pages_reply = ok_reply_parser("put_pages_reply", "stored")


# -- hot-path request header parser --------------------------------------------------------
# The reverse of `page_request_header`, for the page server: a header in exactly its form is
# read with one regex match instead of a pydantic validation and model (~3 us a request warm,
# several times that cold). Numbers are bounded and the tenant matches TENANT_PATTERN, so
# every value it yields is one the model accepts; any other header gives None and is
# validated by the models, which decide (and count) malformed ones as before.
_PAGES_REQUEST = re.compile(
    rb'\{"version":' + str(PROTOCOL_VERSION).encode() + rb',"msg_id":(0|[1-9][0-9]{0,17}),'
    rb'"sent_at":[0-9]{1,12}(?:\.[0-9]{1,20})?,"type":"(put|get|delete)_pages_request",'
    rb'"tenant":"([A-Za-z0-9][A-Za-z0-9._-]{0,62})","volume":(0|[1-9][0-9]{0,9}),'
    rb'"count":([1-9][0-9]{0,3})\}\Z'
)
_match_pages_request = _PAGES_REQUEST.match
_MAX_VOLUME = 2**32


def parse_pages_request(header: Any) -> tuple[str, int, str, int, int] | None:
    """(op, msg_id, tenant, volume, count) of a put/get/delete_pages_request header (any
    buffer) as `page_request_header` writes it, op being "put", "get" or "delete"; None for
    any other header."""
    match = _match_pages_request(header)
    if match is None:
        return None
    op, msg_id, tenant, volume, count = match.group(2, 1, 3, 4, 5)
    volume_id, pages = int(volume), int(count)
    if volume_id >= _MAX_VOLUME or pages > MAX_BATCH_PAGES:
        return None
    return op.decode(), int(msg_id), tenant.decode(), volume_id, pages

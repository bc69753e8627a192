"""Client -> mirror: the local write-behind copy of every page-out (protocol version 1).

The mirror (`remem mirror`) runs on the client host beside `remem client` and keeps a copy
of every page the client sends to the network in a local file or block device, at the
page's device offset (Anemone's local replication). It serves page-ins when no replica can
be reached and remembers which pages were written while the network was down, so that they
can be resynced to the page servers afterwards (also after a client restart).

Sockets
-------
The mirror binds one ROUTER (`--listen`, loopback or ipc:// by default). The client
connects one DEALER and keeps many requests in flight. The mirror executes the requests of
one connection strictly in arrival order (one FIFO, one writer): a read sees every write
sent before it, and a later write of a page always wins over an earlier one. Replies come
back in that same order and are matched by `parent_id`.

A client sends `[b"", header, payload...]`; the ROUTER adds the routing id. With Curve (see
`remem_common.security`) the mirror admits only authorized keys of role client.

Messages and their payload frames
---------------------------------
| request                     | payload frames          | reply                              |
|-----------------------------|-------------------------|------------------------------------|
| describe_mirror_request     | -                       | describe_mirror_reply              |
| attach_mirror_request       | -                       | attach_mirror_reply                |
| detach_mirror_request       | -                       | detach_mirror_reply                |
| write_pages_request         | data (count x 4096)     | write_pages_reply                  |
| write_extents_request       | extents, data           | write_pages_reply                  |
| read_pages_request          | -                       | read_pages_reply + data            |
| trim_pages_request          | -                       | trim_pages_reply                   |
| mark_replicated_request     | -                       | mark_replicated_reply              |
| list_unreplicated_request   | -                       | list_unreplicated_reply + bitmap   |

Pages are addressed by device page number: a request covers the run of `count` pages
starting at `first_page` (1..MAX_MIRROR_PAGES pages, inside the mirror's `page_count`).

- `write_pages_request`: the reply is sent only once the pages are written to the device
  (O_DIRECT, no page cache); with `sync` also after an fdatasync. `replicated=false` marks
  the pages as held by the mirror only (written while no replica could be reached): they
  are remembered, durably, until a `mark_replicated_request` covers them.
- `write_extents_request`: many write-behind writes in one message (the client gathers the
  page-outs of one event-loop turn, or those made while its earlier batches are in flight):
  `extents` runs of pages, `count` pages in all (at most MAX_MIRROR_BATCH_PAGES). The
  `extents` frame is `extents x 16` bytes, one little-endian `(u64 first_page, u64 count)` per run,
  each run 1..MAX_MIRROR_PAGES pages inside the mirror; the data frame is the runs' pages
  back to back (`count x 4096` bytes, and `count` is the sum of the runs' counts). The
  runs apply in order (a later run of a page wins) and are always replicated writes
  without `sync`: the network-down write is `write_pages_request`. One `write_pages_reply`
  (`written` = `count`) once every run is on disk; if the device fails any run, the whole
  request is answered `unavailable`.
- `read_pages_request`: the reply's one payload frame is `count x 4096` bytes (zeros where
  nothing was ever written).
- `trim_pages_request`: the pages read back as zeros afterwards and are no longer
  unreplicated.
- `mark_replicated_request`: the client resynced the pages to their replicas; they are no
  longer unreplicated. Pages written after the resync read them are unaffected, since the
  mirror runs requests in order and the client sends this only after the resync's writes.
- `list_unreplicated_request`: the reply's payload frame is a bitmap of `page_count` bits
  (little-endian bit order, `ceil(page_count / 8)` bytes): bit i set if page i is held by
  the mirror only. A restarted client resyncs these.
- `describe_mirror_request`: the device size and state, so the client can refuse a mirror
  of the wrong size.
- `attach_mirror_request`: a client starts its session. The reply is a description plus
  `complete`: whether the last session ended with a `detach_mirror_request`, i.e. whether the
  mirror is known to hold every write its client acknowledged. A client that crashed, a
  mirror that missed writes, or a new or `--forget`-wiped mirror file says false, and the
  client then must not serve page-ins from it (except its mirror-only pages, which were
  written durably) until it has rebuilt it from the replicas. Before the reply, the mirror
  durably records the session as open (so `complete` is false after any crash from now on).
  The connection that attached last holds the session: writes, trims, marks, detaches and
  attaches from a connection that attached before it are answered `unavailable` (a client
  that timed a stalled mirror out attaches again on a new connection; what its old one still
  had queued must not land after the new one's requests). Connections that never attached
  are not fenced. A client attaches first on every connection it opens.
- `detach_mirror_request`: the client's session ends cleanly and every write it sent before
  reached the mirror. The mirror fdatasyncs and durably records that it is complete. A client
  whose mirror missed writes does not send it.

Errors: `error_reply` with `malformed` (bad frames, counts, a range past the end, a data
frame whose length is not `count x 4096`), `unknown_type`, `unsupported_version`,
`unavailable` (the device failed an I/O: the detail has the errno), `shutting_down`.
A malformed message is answered and counted in `mirror_malformed_messages_total{reason}`;
it never stops the mirror or disturbs other requests.
"""

from __future__ import annotations

import struct
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from remem_common.protocol.envelope import (
    ErrorCode,
    ErrorReply,
    ProtocolError,
    Reply,
    Request,
    ok_reply_parser,
)

# Pages one request may carry: 1 MiB, the largest NBD request the client accepts in one piece
# (larger requests are split by the client).
MAX_MIRROR_PAGES = 256
# Pages one write_extents_request may carry (4 MiB), and runs (each of at least one page).
MAX_MIRROR_BATCH_PAGES = 1024
EXTENT = struct.Struct("<QQ")  # first_page, count

PageNumber = Annotated[int, Field(ge=0, lt=2**40)]
MirrorPageCount = Annotated[int, Field(ge=1, le=MAX_MIRROR_PAGES)]


class PageSpan(BaseModel):
    """Any run of `count` pages from `first_page` (a mixin, as `client_pageserver.VolumeRef`):
    what a trim or a mark covers, however long."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    first_page: PageNumber
    count: Annotated[int, Field(ge=1, lt=2**40)]


class PageRun(PageSpan):
    """A run whose pages travel in the message or its reply: 1..MAX_MIRROR_PAGES pages."""

    count: MirrorPageCount


class DescribeMirrorRequest(Request):
    type: Literal["describe_mirror_request"] = "describe_mirror_request"


class MirrorDescription(Reply):
    """The fields describe_mirror_reply and attach_mirror_reply share."""

    page_count: int = Field(ge=0)
    path: str
    direct_io: bool
    unreplicated_pages: int = Field(ge=0)


class DescribeMirrorReply(MirrorDescription):
    type: Literal["describe_mirror_reply"] = "describe_mirror_reply"


class AttachMirrorRequest(Request):
    type: Literal["attach_mirror_request"] = "attach_mirror_request"


class AttachMirrorReply(MirrorDescription):
    type: Literal["attach_mirror_reply"] = "attach_mirror_reply"
    complete: bool


class DetachMirrorRequest(Request):
    type: Literal["detach_mirror_request"] = "detach_mirror_request"


class DetachMirrorReply(Reply):
    type: Literal["detach_mirror_reply"] = "detach_mirror_reply"


class WritePagesRequest(PageRun, Request):
    """Write `count` pages from `first_page`. Payload: data (count x 4096 bytes)."""

    type: Literal["write_pages_request"] = "write_pages_request"
    replicated: bool = True
    sync: bool = False


class WriteExtentsRequest(Request):
    """Write `extents` runs of `count` pages in all. Payload: extents table, data."""

    type: Literal["write_extents_request"] = "write_extents_request"
    extents: Annotated[int, Field(ge=1, le=MAX_MIRROR_BATCH_PAGES)]
    count: Annotated[int, Field(ge=1, le=MAX_MIRROR_BATCH_PAGES)]


class WritePagesReply(Reply):
    type: Literal["write_pages_reply"] = "write_pages_reply"
    written: int = Field(ge=0)


class ReadPagesRequest(PageRun, Request):
    type: Literal["read_pages_request"] = "read_pages_request"


class ReadPagesReply(Reply):
    """Payload: data (count x 4096 bytes)."""

    type: Literal["read_pages_reply"] = "read_pages_reply"
    count: int = Field(ge=0)


class TrimPagesRequest(PageSpan, Request):
    type: Literal["trim_pages_request"] = "trim_pages_request"


class TrimPagesReply(Reply):
    type: Literal["trim_pages_reply"] = "trim_pages_reply"


class MarkReplicatedRequest(PageSpan, Request):
    type: Literal["mark_replicated_request"] = "mark_replicated_request"


class MarkReplicatedReply(Reply):
    type: Literal["mark_replicated_reply"] = "mark_replicated_reply"
    unreplicated_pages: int = Field(ge=0)


class ListUnreplicatedRequest(Request):
    type: Literal["list_unreplicated_request"] = "list_unreplicated_request"


class ListUnreplicatedReply(Reply):
    """Payload: bitmap (ceil(page_count / 8) bytes, little-endian bit order)."""

    type: Literal["list_unreplicated_reply"] = "list_unreplicated_reply"
    page_count: int = Field(ge=0)
    unreplicated_pages: int = Field(ge=0)


MirrorRequest = Annotated[
    DescribeMirrorRequest
    | AttachMirrorRequest
    | DetachMirrorRequest
    | WritePagesRequest
    | WriteExtentsRequest
    | ReadPagesRequest
    | TrimPagesRequest
    | MarkReplicatedRequest
    | ListUnreplicatedRequest,
    Field(discriminator="type"),
]
MIRROR_REQUEST_ADAPTER: TypeAdapter[MirrorRequest] = TypeAdapter(MirrorRequest)

MirrorReply = Annotated[
    DescribeMirrorReply
    | AttachMirrorReply
    | DetachMirrorReply
    | WritePagesReply
    | ReadPagesReply
    | TrimPagesReply
    | MarkReplicatedReply
    | ListUnreplicatedReply
    | ErrorReply,
    Field(discriminator="type"),
]
MIRROR_REPLY_ADAPTER: TypeAdapter[MirrorReply] = TypeAdapter(MirrorReply)

# Payload frames each request type carries (decode checks the count).
PAYLOAD_FRAMES: dict[str, int] = {
    "describe_mirror_request": 0,
    "attach_mirror_request": 0,
    "detach_mirror_request": 0,
    "write_pages_request": 1,
    "write_extents_request": 2,
    "read_pages_request": 0,
    "trim_pages_request": 0,
    "mark_replicated_request": 0,
    "list_unreplicated_request": 0,
}


def pack_extents(runs: list[tuple[int, int]]) -> bytes:
    """The extents frame of a write_extents_request: `(first_page, count)` per run."""
    return b"".join(EXTENT.pack(first, count) for first, count in runs)


def unpack_extents(frame: Any, msg: WriteExtentsRequest, page_count: int) -> list[tuple[int, int]]:
    """The runs of a write_extents_request, each checked against the mirror's size.

    Raises:
        ProtocolError: the frame's length, a run's count or range, or the runs' total is
            wrong (`bad_payload`, or `bad_fields` for a run past the end).
    """
    view = memoryview(frame).cast("B")
    if view.nbytes != msg.extents * EXTENT.size:
        raise ProtocolError(
            ErrorCode.MALFORMED,
            f"extents frame of {view.nbytes} bytes; {msg.extents} runs take "
            f"{msg.extents * EXTENT.size}",
            reason="bad_payload",
            msg_id=msg.msg_id,
        )
    runs = list(EXTENT.iter_unpack(view))
    total = 0
    for first, count in runs:
        if not 1 <= count <= MAX_MIRROR_PAGES:
            raise ProtocolError(
                ErrorCode.MALFORMED,
                f"a run of {count} pages; runs are 1..{MAX_MIRROR_PAGES} pages",
                reason="bad_payload",
                msg_id=msg.msg_id,
            )
        if first + count > page_count:
            raise ProtocolError(
                ErrorCode.MALFORMED,
                f"pages {first}..{first + count - 1} are past the end of the mirror "
                f"({page_count} pages)",
                reason="bad_fields",
                msg_id=msg.msg_id,
            )
        total += count
    if total != msg.count:
        raise ProtocolError(
            ErrorCode.MALFORMED,
            f"runs of {total} pages in all; the request says {msg.count}",
            reason="bad_payload",
            msg_id=msg.msg_id,
        )
    return runs


# A write_pages_reply answers every page-out batch; the form the mirror's `model_dump_json`
# writes it in, read back by the client.
parse_write_pages_reply = ok_reply_parser("write_pages_reply", "written")

"""Page server -> page server: slab transfer for re-replication (protocol version 1).

Sockets
-------
The source page server (ordered by placement with `push_slab_request`) connects a DEALER to
the target's data ROUTER and streams the slab as `receive_slab_pages_request` chunks, a
bounded window of them in flight, each answered by `receive_slab_pages_reply`.

Payload frames of `receive_slab_pages_request`: page indices (count x u32, within the slab),
checksums (count x u32 CRC-32C), data (count x 4096 bytes), seals (count x 28 bytes: each
page's nonce and tag as its client sent them, so a re-replicated page still decrypts);
codecs in `protocol.pages`.

Ordering with live writes: a client may write a page to the target (already its replica in
the new map) while the push is in flight; the pushed copy is older. So the target stores a
pushed page only where it holds none yet, unless `overwrite` is set (used when the target's
copy is known stale). The reply counts pages stored and pages skipped as already present.

Security (Curve, see `remem_common.security`): the source connects with its own page server
key to the target key placement gave it (`target_public_key`); only a key of role pageserver
may send `receive_slab_pages_request` (for any tenant), anything else is `forbidden`.

Errors: `error_reply` with `forbidden`, `malformed`, `bad_checksum` (nothing of the chunk stored),
`no_space` (nothing of the chunk stored).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, TypeAdapter

from remem_common.protocol.client_pageserver import PageCount, SlabRef
from remem_common.protocol.envelope import ErrorReply, Reply, Request
from remem_common.protocol.pageserver_placement import ServerId


class ReceiveSlabPagesRequest(SlabRef, Request):
    """One chunk of a slab push. Payload: page indices, checksums, data, seals."""

    type: Literal["receive_slab_pages_request"] = "receive_slab_pages_request"
    source_server: ServerId
    count: PageCount
    overwrite: bool = False


class ReceiveSlabPagesReply(Reply):
    type: Literal["receive_slab_pages_reply"] = "receive_slab_pages_reply"
    stored: int = Field(ge=0)
    skipped: int = Field(ge=0)


PeerReply = Annotated[ReceiveSlabPagesReply | ErrorReply, Field(discriminator="type")]
PEER_REPLY_ADAPTER: TypeAdapter[PeerReply] = TypeAdapter(PeerReply)

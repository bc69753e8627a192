"""A blocking client of one page server, for tools, tests and benchmarks.

The NBD client's hot path uses its own asyncio sender; this one keeps each call simple
(send, wait for the matching reply with a timeout) and offers `pipeline` for throughput runs.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, Field, TypeAdapter

from remem_common.dealer import RefusedRequest, RequestDealer
from remem_common.protocol.client_pageserver import (
    DataReply,
    DeletePagesReply,
    DeletePagesRequest,
    GetPagesReply,
    GetPagesRequest,
    PutPagesReply,
    PutPagesRequest,
)
from remem_common.protocol.envelope import ErrorReply
from remem_common.protocol.pages import (
    SEAL_BYTES,
    KeyArray,
    PageArray,
    U32Array,
    checksum_pages,
    unpack_crcs,
    unpack_pages,
    unpack_seals,
)
from remem_common.protocol.pageserver_placement import (
    DropSlabReply,
    DropSlabRequest,
    ListInventoryReply,
    ListInventoryRequest,
    PushSlabReply,
    PushSlabRequest,
    SlabOrderReplies,
)

# A page server answers clients' data requests and placement's slab orders on one socket.
AnyReply = Annotated[DataReply | SlabOrderReplies | ErrorReply, Field(discriminator="type")]
REPLY_ADAPTER: TypeAdapter[AnyReply] = TypeAdapter(AnyReply)


class PageServerError(RefusedRequest):
    """The page server answered with an error reply."""


class PageServerTimeout(Exception):
    """No reply within the timeout."""


class PageServerClient(RequestDealer):
    """Blocking requests to one page server over a DEALER socket."""

    reply_adapter = REPLY_ADAPTER
    timeout_type = PageServerTimeout
    refused_type = PageServerError

    # -- page operations -------------------------------------------------------------------

    def put(
        self,
        tenant: str,
        volume: int,
        keys: KeyArray,
        pages: PageArray,
        seals: PageArray | None = None,
    ) -> int:
        """Store pages as given; `seals` default to zeros (pages a client did not seal)."""
        crcs = checksum_pages(pages)
        if seals is None:
            seals = np.zeros((keys.shape[0], SEAL_BYTES), dtype=np.uint8)
        reply, _ = self.call(
            PutPagesRequest(
                msg_id=self.next_id(), tenant=tenant, volume=volume, count=keys.shape[0]
            ),
            keys,
            crcs,
            np.ascontiguousarray(pages),
            np.ascontiguousarray(seals),
        )
        assert isinstance(reply, PutPagesReply)
        return reply.stored

    def get(
        self, tenant: str, volume: int, keys: KeyArray
    ) -> tuple[np.ndarray[Any, np.dtype[np.bool_]], U32Array, PageArray]:
        """(found, checksums, data) for `keys`."""
        found, crcs, data, _ = self.get_sealed(tenant, volume, keys)
        return found, crcs, data

    def get_sealed(
        self, tenant: str, volume: int, keys: KeyArray
    ) -> tuple[np.ndarray[Any, np.dtype[np.bool_]], U32Array, PageArray, PageArray]:
        """(found, checksums, data, seals) for `keys`."""
        count = keys.shape[0]
        reply, frames = self.call(
            GetPagesRequest(msg_id=self.next_id(), tenant=tenant, volume=volume, count=count),
            keys,
        )
        assert isinstance(reply, GetPagesReply)
        found = np.frombuffer(frames[0], dtype=np.uint8).astype(np.bool_)
        return (
            found,
            unpack_crcs(frames[1], count),
            unpack_pages(frames[2], count),
            unpack_seals(frames[3], count),
        )

    def delete(self, tenant: str, volume: int, keys: KeyArray) -> int:
        reply, _ = self.call(
            DeletePagesRequest(
                msg_id=self.next_id(), tenant=tenant, volume=volume, count=keys.shape[0]
            ),
            keys,
        )
        assert isinstance(reply, DeletePagesReply)
        return reply.deleted

    # -- slab operations -------------------------------------------------------------------

    def inventory(self) -> ListInventoryReply:
        reply, _ = self.call(ListInventoryRequest(msg_id=self.next_id()))
        assert isinstance(reply, ListInventoryReply)
        return reply

    def drop_slab(self, tenant: str, volume: int, slab: int) -> int:
        reply, _ = self.call(
            DropSlabRequest(msg_id=self.next_id(), tenant=tenant, volume=volume, slab=slab)
        )
        assert isinstance(reply, DropSlabReply)
        return reply.dropped

    def push_slab(
        self, tenant: str, volume: int, slab: int, target: str, *, timeout: float = 30.0
    ) -> PushSlabReply:
        reply, _ = self.call(
            PushSlabRequest(
                msg_id=self.next_id(),
                tenant=tenant,
                volume=volume,
                slab=slab,
                target_endpoint=target,
                timeout=timeout,
            ),
            timeout=timeout + 5,
        )
        assert isinstance(reply, PushSlabReply)
        return reply

    def pipeline(self, requests: Iterable[tuple[BaseModel, tuple[Any, ...]]], window: int) -> int:
        """Send requests keeping up to `window` in flight; returns how many were answered."""
        inflight = 0
        answered = 0
        for msg, payload in requests:
            if inflight >= window:
                self.receive()
                inflight -= 1
                answered += 1
            self.send(msg, *payload)
            inflight += 1
        while inflight:
            self.receive()
            inflight -= 1
            answered += 1
        return answered

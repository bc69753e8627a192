"""A blocking client of the mirror, for tools and tests.

`remem client` talks to the mirror with its own asyncio sender; this one keeps each call
simple (send, wait for the matching reply with a timeout) and offers `send` / `receive` for
pipelining many requests, whose replies come back in order.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from remem_common.dealer import RefusedRequest, RequestDealer
from remem_common.protocol.client_mirror import (
    MIRROR_REPLY_ADAPTER,
    DescribeMirrorReply,
    DescribeMirrorRequest,
    ListUnreplicatedReply,
    ListUnreplicatedRequest,
    MarkReplicatedReply,
    MarkReplicatedRequest,
    ReadPagesReply,
    ReadPagesRequest,
    TrimPagesRequest,
    WritePagesReply,
    WritePagesRequest,
)
from remem_common.protocol.pages import PAGE_SIZE, PageArray, unpack_pages


class MirrorError(RefusedRequest):
    """The mirror answered with an error reply."""


class MirrorTimeout(Exception):
    """No reply within the timeout."""


class MirrorClient(RequestDealer):
    """Blocking requests to one mirror over a DEALER socket."""

    reply_adapter = MIRROR_REPLY_ADAPTER
    timeout_type = MirrorTimeout
    refused_type = MirrorError

    # -- requests --------------------------------------------------------------------------

    def write_request(
        self, first: int, count: int, *, replicated: bool = True, sync: bool = False
    ) -> WritePagesRequest:
        return WritePagesRequest(
            msg_id=self.next_id(),
            first_page=first,
            count=count,
            replicated=replicated,
            sync=sync,
        )

    def write(self, first: int, pages: Any, *, replicated: bool = True, sync: bool = False) -> int:
        """Write `pages` (N x 4096 bytes) from page `first`; returns pages written."""
        data = np.ascontiguousarray(pages, dtype=np.uint8).reshape(-1)
        count = data.size // PAGE_SIZE
        reply, _ = self.call(
            self.write_request(first, count, replicated=replicated, sync=sync), data
        )
        assert isinstance(reply, WritePagesReply)
        return reply.written

    def read(self, first: int, count: int) -> PageArray:
        """`count` pages from `first` as a (count, 4096) uint8 array."""
        reply, frames = self.call(
            ReadPagesRequest(msg_id=self.next_id(), first_page=first, count=count)
        )
        assert isinstance(reply, ReadPagesReply)
        return unpack_pages(frames[0], count)

    def trim(self, first: int, count: int) -> None:
        self.call(TrimPagesRequest(msg_id=self.next_id(), first_page=first, count=count))

    def mark_replicated(self, first: int, count: int) -> int:
        """Returns the pages still unreplicated afterwards."""
        reply, _ = self.call(
            MarkReplicatedRequest(msg_id=self.next_id(), first_page=first, count=count)
        )
        assert isinstance(reply, MarkReplicatedReply)
        return reply.unreplicated_pages

    def list_unreplicated(self) -> npt.NDArray[np.bool_]:
        """One bool per page: held by the mirror only."""
        reply, frames = self.call(ListUnreplicatedRequest(msg_id=self.next_id()))
        assert isinstance(reply, ListUnreplicatedReply)
        bits = np.unpackbits(np.frombuffer(frames[0], dtype=np.uint8), bitorder="little")
        return bits[: reply.page_count].astype(np.bool_)

    def describe(self) -> DescribeMirrorReply:
        reply, _ = self.call(DescribeMirrorRequest(msg_id=self.next_id()))
        assert isinstance(reply, DescribeMirrorReply)
        return reply

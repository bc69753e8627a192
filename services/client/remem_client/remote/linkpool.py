"""The backend's links to page servers: one per server, opened as the slab map names them.

This is the one module of the backend that names a link class (`links.PageServerLink`, the
ZeroMQ side). The other parts ask a `Links` for a server's `Link` and submit page batches
to it, so the data path runs over a fake pool in the unit tests (tests/unit/test_remote_*).

Also here: how a run of pages is keyed on the wire (`run_keys`), which both reads and
writes need.
"""

from __future__ import annotations

import asyncio
import functools
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from remem_common.protocol.pages import SLAB_PAGES, PageArray, U32Array
from remem_common.security import Security

from remem_client.links import GetResult, PageServerLink, ReplicaFailure, page_keys

if TYPE_CHECKING:
    import zmq

    from remem_client.metrics import MalformedReplies

__all__ = [
    "FAST_PAGES",
    "GetResult",
    "Link",
    "LinkPool",
    "Links",
    "Replica",
    "ReplicaFailure",
    "page_keys",
    "run_keys",
]

# Runs of up to this many pages within one slab take the plain-Python paths (keys packed
# with struct, checksums with crc32c): numpy's per-call cost dominates at that size.
FAST_PAGES = 64
_PAIRS = [struct.Struct(f"<{2 * n}I") for n in range(FAST_PAGES + 1)]


@dataclass(frozen=True)
class Replica:
    """A page server holding a slab."""

    server_id: str
    endpoint: str
    public_key: str | None = None  # the page server's Curve key (from placement)


class Link(Protocol):
    """What the backend submits to one page server (see `links.PageServerLink`). Every
    submit joins this callback's batch and returns the batch's future; it raises
    `ReplicaFailure` at once if the link is closed."""

    def submit_get(self, keys: Any, first: int, last: int) -> tuple[asyncio.Future[GetResult], int]:
        """Read pages; the GetResult holds this caller's rows from the second value on."""
        ...

    def submit_put(
        self, keys: Any, crcs: U32Array, data: PageArray, seals: PageArray, first: int, last: int
    ) -> asyncio.Future[Any]:
        """Store pages (all or nothing on this server); the future gives how many."""
        ...

    def submit_delete(self, keys: Any, first: int, last: int) -> asyncio.Future[Any]:
        """Free pages."""
        ...

    def gathering(self, op: str) -> bool:
        """Whether a batch of `op` is open (not sent yet): a caller may join it."""
        ...


class Links(Protocol):
    """The links to every page server the slab map names."""

    def link(self, replica: Replica) -> Link:
        """The link to `replica`'s server (opened if there is none)."""
        ...

    def get(self, server_id: str) -> Link | None:
        """The link to `server_id`, if one is open."""
        ...

    def connect(self, replica: Replica) -> None:
        """Open the link to `replica`'s server now, or anew if its address or key changed."""
        ...

    def keep_only(self, server_ids: Iterable[str]) -> None:
        """Close the links to every server not in `server_ids`."""
        ...

    def close(self) -> None: ...


class LinkPool:
    """`Links` over ZeroMQ: a `PageServerLink` per page server."""

    def __init__(
        self,
        context: zmq.Context[zmq.Socket[bytes]],
        security: Security | None,
        tenant: str,
        volume: int,
        timeout: float,
        malformed: MalformedReplies | None,
    ) -> None:
        """Links of `tenant`'s `volume`; a batch unanswered after `timeout` seconds fails."""
        self._new_link = functools.partial(
            PageServerLink,
            context=context,
            security=security or Security.insecure(),
            tenant=tenant,
            volume=volume,
            timeout=timeout,
            malformed=malformed,
        )
        self._links: dict[str, PageServerLink] = {}

    def link(self, replica: Replica) -> Link:
        # The hot path: a dict lookup, the address checked only when the map changes
        # (`connect`).
        link = self._links.get(replica.server_id)
        return link if link is not None else self._open(replica)

    def get(self, server_id: str) -> Link | None:
        return self._links.get(server_id)

    def connect(self, replica: Replica) -> None:
        self._open(replica)

    def _open(self, replica: Replica) -> PageServerLink:
        link = self._links.get(replica.server_id)
        if (
            link is None
            or link.endpoint != replica.endpoint
            or link.server_key != replica.public_key
        ):
            if link is not None:
                link.close()
            link = self._new_link(
                replica.server_id, replica.endpoint, server_key=replica.public_key
            )
            self._links[replica.server_id] = link
        return link

    def keep_only(self, server_ids: Iterable[str]) -> None:
        keep = set(server_ids)
        for server_id in list(self._links):
            if server_id not in keep:
                self._links.pop(server_id).close()

    def close(self) -> None:
        for link in self._links.values():
            link.close()
        self._links.clear()


def run_keys(first: int, count: int) -> Any:
    """The keys of pages [first, first + count) of one slab: packed bytes in plain Python up
    to FAST_PAGES (numpy costs more there), a key array above."""
    if count > FAST_PAGES:
        return page_keys(first, count, SLAB_PAGES)
    slab = first // SLAB_PAGES
    page = first - slab * SLAB_PAGES
    pairs = [slab] * (2 * count)  # [slab, page, slab, page + 1, ...]
    pairs[1::2] = range(page, page + count)
    return _PAIRS[count].pack(*pairs)

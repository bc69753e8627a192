"""The slab map and replica health: which page servers hold each slab, and which to use.

Per slab the client keeps the ids of its replicas (a few bytes per 64 MiB slab) and the push
targets a re-replication is filling (written to, not read from yet). Placement writes here:
its answers to allocations and its map updates (`placement_link`), and its replies to
missed-write reports. The backend's parts read here which replicas to write and to read.

Health, as the client sees it: a replica that failed a request is left alone for
FAILURE_BACKOFF seconds (unless placement's map drops it first). A replica that missed a
write another replica stored (it failed it, timed out, or was skipped while backing off)
holds a stale copy even once it answers again: it is not read for that slab any more and is
reported to placement with `missed_write`, which replaces it.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Callable
from typing import Protocol

from remem_client.backend import BackendError
from remem_client.remote.linkpool import Links, Replica, ReplicaFailure
from remem_client.remote.pagemap import PageMap
from remem_client.remote.stats import RemoteStats

__all__ = ["FAILURE_BACKOFF", "Replica", "SlabMap", "SlabPlacement", "StaleMark"]

log = logging.getLogger("client.remote")

# Seconds a replica that failed a request is left alone before it is tried again (unless
# placement's map drops it first).
FAILURE_BACKOFF = 5.0


class SlabPlacement(Protocol):
    """What the backend needs of placement (implemented by the placement client)."""

    async def allocate(self, slab: int) -> list[Replica]:
        """The replicas of `slab`, allocating them on first use."""
        ...

    def report_failure(
        self, server_id: str, slab: int, detail: str, *, missed_write: bool = False
    ) -> None:
        """Tell placement a replica failed a request (fire and forget); `missed_write`: it
        did not store a write of the slab that another replica stored (its copy is stale).
        The placement client calls `SlabMap.stale_reported` with the reply's epoch."""
        ...


class StaleMark:
    """A replica that missed a write of a slab: when it was reported, and the epoch of
    placement's answer (None until it answers)."""

    __slots__ = ("answered", "reported")

    def __init__(self, reported: float) -> None:
        self.reported = reported
        self.answered: int | None = None


class SlabMap:
    """Replicas and push targets per slab, with the health of each page server."""

    def __init__(
        self,
        pages: PageMap,
        placement: SlabPlacement,
        links: Links,
        stats: RemoteStats,
        *,
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        self.slab_count = pages.slab_count
        self._pages = pages
        self._placement = placement
        self._links = links
        self._stats = stats
        self._on_failure = on_failure
        self.replicas: list[list[Replica] | None] = [None] * self.slab_count
        # Servers a slab push is filling right now: written to, not yet read from.
        self.filling: list[list[Replica]] = [[] for _ in range(self.slab_count)]
        self._allocating: dict[int, asyncio.Future[list[Replica]]] = {}
        # server id -> when it failed; skipped for FAILURE_BACKOFF seconds while placement
        # still lists it (a dead one leaves the map and is forgotten then).
        self._failed: dict[str, float] = {}
        # slab -> {server id: mark}: replicas that missed a write of the slab (stale copies).
        # Not read from until placement's map, at or after the reply's epoch, shows what it
        # made of the report.
        self._stale: dict[int, dict[str, StaleMark]] = {}

    def nbytes(self) -> int:
        """Client memory the map takes (an estimate: a pointer per slab, two per replica)."""
        entries = sum(len(r) for r in self.replicas if r is not None)
        return 8 * self.slab_count + 16 * entries

    # -- placement writes ------------------------------------------------------------------

    def set_replicas(
        self,
        slab: int,
        replicas: list[Replica],
        filling: list[Replica] | None = None,
        *,
        adopted: bool = False,
    ) -> None:
        """Adopt a replica set for `slab` (a map update from placement).

        Args:
            replicas: servers holding the slab: read and written.
            filling: servers a slab push is copying to: written, not read yet.
            adopted: the slab comes from placement's map, not from our own allocation
                (client restart): its written pages are unknown here.
        """
        if adopted and self.replicas[slab] is None:
            self._pages.unknown[slab] = True
        self.replicas[slab] = list(replicas)
        self.filling[slab] = list(filling or [])
        for replica in [*replicas, *self.filling[slab]]:
            # Now, not at the first request: a server that moved gets a new link at once.
            self._links.connect(replica)

    def keep_only_servers(self, server_ids: set[str]) -> None:
        """Close links to servers placement no longer lists (dead or drained)."""
        self._links.keep_only(server_ids)
        for server_id in list(self._failed):
            if server_id not in server_ids:
                del self._failed[server_id]

    def stale_reported(self, server_id: str, slab: int, epoch: int) -> None:
        """Placement answered a missed-write report at map `epoch`."""
        mark = self._stale.get(slab, {}).get(server_id)
        if mark is not None and mark.answered is None:
            mark.answered = epoch

    def map_applied(self, epoch: int) -> None:
        """After a map at `epoch` was applied: forget stale marks placement has acted on
        (the server left the slab, or the map is at or past the report's answer: it was
        kept as the last copy, or replaced and filled anew), report unanswered ones again."""
        now = time.monotonic()
        for slab, marks in list(self._stale.items()):
            listed = {r.server_id for r in self.replicas[slab] or []}
            for server_id, mark in list(marks.items()):
                answered = mark.answered
                if server_id not in listed or (answered is not None and epoch >= answered):
                    del marks[server_id]
                elif answered is None and now - mark.reported >= FAILURE_BACKOFF:
                    marks[server_id] = StaleMark(now)
                    self._placement.report_failure(
                        server_id, slab, "missed a write", missed_write=True
                    )
            if not marks:
                del self._stale[slab]

    # -- which replicas --------------------------------------------------------------------

    async def replicas_of(self, slab: int) -> list[Replica]:
        """The replicas of `slab`, asking placement to allocate them on its first write."""
        replicas = self.replicas[slab]
        if replicas is not None:
            return replicas
        pending = self._allocating.get(slab)
        if pending is None:
            pending = asyncio.get_running_loop().create_future()
            self._allocating[slab] = pending
            try:
                allocated = await self._placement.allocate(slab)
            except Exception as exc:
                pending.set_exception(exc)
                pending.exception()  # retrieved here; waiters re-raise it
                del self._allocating[slab]
                raise BackendError(errno.EIO, f"no replicas for slab {slab}: {exc}") from exc
            self.set_replicas(slab, allocated)
            del self._allocating[slab]
            pending.set_result(allocated)
            return allocated
        try:
            return await pending
        except Exception as exc:
            raise BackendError(errno.EIO, f"no replicas for slab {slab}: {exc}") from exc

    def live(self, replicas: list[Replica]) -> list[Replica]:
        """`replicas` without those backing off after a failure."""
        if not self._failed:
            return replicas
        now = time.monotonic()
        for server_id, since in list(self._failed.items()):
            if now - since > FAILURE_BACKOFF:
                del self._failed[server_id]
        return [r for r in replicas if r.server_id not in self._failed]

    def write_targets(self, slab: int, replicas: list[Replica]) -> list[Replica]:
        """Live replicas and push targets of `slab`: where its writes go."""
        return self.live([*replicas, *self.filling[slab]])

    def readable(self, slab: int, replicas: list[Replica]) -> list[Replica]:
        """Live replicas of `slab` without a missed write; all live ones if that is none
        (a stale copy is then all there is)."""
        live = self.live(replicas)
        stale = self._stale.get(slab)
        if not stale:
            return live
        fresh = [r for r in live if r.server_id not in stale]
        return fresh or live

    # -- what went wrong -------------------------------------------------------------------

    def replica_failed(self, failure: ReplicaFailure, slab: int) -> None:
        """A replica failed a request of `slab`: back off from it and tell placement."""
        self._stats.replica_failures += 1
        if failure.server_id not in self._failed:
            log.warning(
                "replica failed server=%s code=%s detail=%s",
                failure.server_id,
                failure.code,
                failure.detail,
            )
            self._failed[failure.server_id] = time.monotonic()
            if self._on_failure is not None:
                self._on_failure(failure.server_id)
        self._placement.report_failure(failure.server_id, slab, f"{failure.code}")

    def missed_write(self, slab: int, server_id: str) -> None:
        """`server_id` did not store a write of `slab` that another replica stored: its
        copy is stale. Stop reading it and tell placement, which replaces it."""
        marks = self._stale.setdefault(slab, {})
        mark = marks.get(server_id)
        now = time.monotonic()
        if mark is not None and (
            mark.answered is not None or now - mark.reported < FAILURE_BACKOFF
        ):
            return  # reported already (and answered, or not long ago)
        if mark is None:
            log.warning(
                "replica %s missed a write of slab %d: not read until replaced", server_id, slab
            )
            self._stats.missed_writes += 1
        marks[server_id] = StaleMark(now)
        self._placement.report_failure(server_id, slab, "missed a write", missed_write=True)

    def damaged(self, server_id: str, slab: int) -> None:
        """`server_id` lacks or corrupts pages of `slab` (a read failed over): tell placement."""
        self._placement.report_failure(server_id, slab, "missing or corrupt pages")

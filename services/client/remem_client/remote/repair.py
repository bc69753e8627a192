"""Read repair: good copies of pages written back to replicas that served them damaged.

A read that fails over because a replica served pages corrupt (bad checksum or tag) or not
at all (where they are known written) hands the copies it then got intact, as they are on
the wire (sealed), to `ReadRepair.repair`, which puts them back on the damaged replicas in
the background; the read does not wait. See `repair` for when that is safe.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np
from remem_common.protocol.pages import KeyArray, PageArray, checksum_pages

from remem_client.mirror_link import consume_outcome
from remem_client.remote.core import Core, Part
from remem_client.remote.linkpool import Replica, ReplicaFailure

log = logging.getLogger("client.remote")

# Pages of read repair in flight at most (16 MiB): past it, repairs are skipped (counted).
REPAIR_PAGES_MAX = 4096

# What a read found damaged: per replica, the rows of the read's keys it served damaged.
Damaged = list[tuple[Replica, np.ndarray[Any, np.dtype[np.intp]]]]


class ReadRepair(Part):
    """Writes good copies back, at most REPAIR_PAGES_MAX pages at a time."""

    def __init__(self, core: Core) -> None:
        super().__init__(core)
        self.repairing = 0  # pages in flight

    def repair(
        self,
        slab: int,
        first: int,
        count: int,
        keys: KeyArray,
        rows: PageArray,
        seals: PageArray,
        damaged: Damaged,
        write_mark: int | None,
    ) -> None:
        """Write the good copies of pages back to replicas that served them corrupt or not
        at all, in the background (the read does not wait), bounded by REPAIR_PAGES_MAX.

        Only when the slab had no write or trim in flight when the read started and none
        since (`write_mark`, from `WriteOrdering.slab_write_mark`): then the good copy is
        the newest acknowledged data, and any later write to the replica is sent after the
        repair on the same link, so the repair can never put older data over a newer write.
        Otherwise it is skipped; the next read of the page tries again.

        Args:
            first, count: the pages the read asked for (the span the link batches by).
            keys, rows, seals: the read's keys and the good copies, as served, by row.
            damaged: which rows each damaged replica served damaged.
        """
        pages = sum(int(positions.size) for _, positions in damaged)
        if write_mark is None or self._ordering.slab_write_mark(slab) != write_mark:
            self._stats.read_repairs_skipped += pages
            return
        if self.repairing + pages > REPAIR_PAGES_MAX:
            self._stats.read_repairs_skipped += pages
            return
        current = self._slabs.replicas[slab] or []
        for replica, positions in damaged:
            if replica not in current:
                continue  # left the slab meanwhile: nothing to repair there
            good_rows = rows[positions]  # as served: sealed when pages are encrypted
            link = self._links.link(replica)
            try:
                future = link.submit_put(
                    keys[positions],
                    checksum_pages(good_rows),
                    good_rows,
                    seals[positions],
                    first,
                    first + count - 1,
                )
            except ReplicaFailure:
                self._stats.read_repairs_failed += int(positions.size)
                continue
            self.repairing += int(positions.size)
            task = asyncio.ensure_future(self._done(replica, slab, int(positions.size), future))
            task.add_done_callback(consume_outcome)

    async def _done(
        self, replica: Replica, slab: int, pages: int, future: asyncio.Future[Any]
    ) -> None:
        try:
            await future
        except ReplicaFailure as failure:
            self._stats.read_repairs_failed += pages
            log.warning(
                "read repair of %d pages on %s failed: %s", pages, replica.server_id, failure
            )
            return
        finally:
            self.repairing -= pages
        self._stats.read_repairs += pages
        log.info(
            "read repair: wrote %d good pages of slab %d back to %s", pages, slab, replica.server_id
        )

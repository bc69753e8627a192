"""Mirror rebuild: the device copied from the replicas to a mirror that may have missed writes.

A client that attaches to a mirror whose last session did not end cleanly, or whose mirror
timed out with writes in flight, cannot trust it to serve page-ins (`MirrorLink.incomplete`).
The resync task rebuilds it in the background while writes go on: see
`MirrorRebuild.rebuild` for how a run read from the replicas never lands on the mirror after
a newer write of the same pages.
"""

from __future__ import annotations

import logging
import time

import numpy as np
from remem_common.protocol.client_mirror import MAX_MIRROR_PAGES
from remem_common.protocol.pages import PAGE_SIZE, SLAB_PAGES, PageArray

from remem_client.backend import BackendError
from remem_client.mirror_link import MirrorFailure, MirrorLink
from remem_client.remote.core import Core, Part
from remem_client.remote.pagemap import runs
from remem_client.remote.reads import ReplicaReads

log = logging.getLogger("client.remote")
# Times a mirror rebuild reads a run again, or waits, because writes of it were in flight,
# before the round gives up (the next one resumes there).
REBUILD_REREADS = 50


class MirrorRebuild(Part):
    """Rounds of copying the device to the mirror, resumed where the last one stopped."""

    def __init__(self, core: Core, *, reads: ReplicaReads, mirror: MirrorLink) -> None:
        super().__init__(core)
        self._reads = reads
        self.mirror = mirror
        # Where the next round starts, and the mirror's losses it started after.
        self._cursor = 0
        self._losses = -1

    async def rebuild(self) -> bool:
        """Copy the device from the replicas to a mirror that may have missed writes, then
        trust it again; returns whether it is complete.

        Slab by slab: a slab with no written page is one trim, the others are read in runs of
        MAX_MIRROR_PAGES and written to the mirror (runs of zeros trimmed). Pages the mirror
        alone holds (unreplicated) are left as they are. Writes go on meanwhile: each run is
        sent to the mirror only if no change of its pages was in flight or started while it
        was read, and before any later change's write-behind (the mirror applies requests in
        order). If the replicas or the mirror fail, the round stops; the next one (the resync
        task's) goes on from there, or starts over if the mirror lost writes meanwhile."""
        mirror = self.mirror
        if not mirror.incomplete:
            return True
        if mirror.losses != self._losses:
            self._cursor, self._losses = 0, mirror.losses
            log.warning("rebuilding the mirror from the replicas (it may have missed writes)")
        started = time.monotonic()
        page_count = self._pages.page_count
        while self._cursor < page_count:
            first = self._cursor
            slab_end = min((first // SLAB_PAGES + 1) * SLAB_PAGES, page_count)
            if self._pages.maybe_written(first, slab_end - first).any():
                count = min(MAX_MIRROR_PAGES, slab_end - first)
            else:
                count = slab_end - first
            copied = await self._run(first, count)
            if copied is None or mirror.losses != self._losses:
                return False
            self._stats.pages_rebuilt += copied
            self._cursor = first + count
        try:
            await mirror.barrier()  # every run sent is on the mirror's disk
        except MirrorFailure:
            return False
        if mirror.losses != self._losses:
            return False
        mirror.incomplete = False
        self._stats.mirror_rebuilds += 1
        self._cursor, self._losses = 0, -1
        log.info(
            "mirror rebuilt: it holds every page again (last round %.1f s)",
            time.monotonic() - started,
        )
        return True

    async def _run(self, first: int, count: int) -> int | None:
        """Copy pages [first, first + count) of one slab from the replicas to the mirror;
        returns the pages written (not trimmed), or None to stop the round."""
        mirror = self.mirror
        ordering = self._ordering
        run = ordering.watch(first, first + count)
        try:
            rereads = 0
            while rereads < REBUILD_REREADS:
                busy = ordering.busy(run.first, run.end)
                if busy is not None:
                    # It started before we looked and may land after our read: wait for it.
                    rereads += 1
                    await ordering.finished(busy)
                    continue
                run.changed = False
                written = self._pages.maybe_written(first, count)
                rows = await self._reads.read_pages(first, count) if written.any() else None
                await mirror.wait_for_room(0 if rows is None else count * PAGE_SIZE)
                if run.changed:
                    rereads += 1  # a change started meanwhile: what we read may be older
                    continue
                if not mirror.up:
                    return None
                return self._send(first, count, rows)  # no await since the check
            log.info("mirror rebuild: pages %d+%d keep changing; trying later", first, count)
            return None
        except BackendError as exc:
            log.info("mirror rebuild: pages %d+%d unreadable (%s); trying later", first, count, exc)
            return None
        finally:
            ordering.unwatch()

    def _send(self, first: int, count: int, rows: PageArray | None) -> int:
        mirror = self.mirror
        if self._pages.unreplicated is None:
            copy = [(first, count)]
        else:
            keep = ~self._pages.unreplicated_mask(first, count)  # mirror-only pages stay
            copy = runs(np.flatnonzero(keep) + first)
        written = 0
        for run_first, run_count in copy:
            if not mirror.up:
                break  # lost on the way (a failed send): the round sees the loss and stops
            if rows is None:
                mirror.trim(run_first, run_count)
                continue
            part = rows[run_first - first : run_first - first + run_count]
            if part.any():
                mirror.queue_write(run_first, part.tobytes())
                # A mark left from a resync whose mark_replicated the mirror lost must go:
                # the page is not mirror-only (a trim clears it by itself).
                mirror.clear_unreplicated(run_first, run_count)
                written += run_count
            else:
                mirror.trim(run_first, run_count)
        return written

"""Resync: pages written to the mirror alone (network down) copied to their replicas.

One background task, on a timer: it polls whether the replicas answer again by trying to
copy the mirror-only pages to them, and, once none is waiting, rebuilds a mirror that may
have missed writes (`rebuild`).
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np
from remem_common.protocol.pages import SLAB_PAGES

from remem_client.backend import BackendError
from remem_client.mirror_link import MirrorFailure
from remem_client.remote.core import Core, Part
from remem_client.remote.fallback import MirrorFallback
from remem_client.remote.pagemap import runs, slab_segments
from remem_client.remote.rebuild import MirrorRebuild
from remem_client.remote.writes import ReplicaWrites

log = logging.getLogger("client.remote")


class Resync(Part):
    """The task that keeps the replicas, and the mirror, complete."""

    def __init__(
        self,
        core: Core,
        *,
        fallback: MirrorFallback,
        writes: ReplicaWrites,
        rebuild: MirrorRebuild,
        interval: float,
    ) -> None:
        super().__init__(core)
        self._fallback = fallback
        self._writes = writes
        self._rebuild = rebuild
        self._mirror = rebuild.mirror
        self._interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _loop(self) -> None:
        pages, fallback, mirror = self._pages, self._fallback, self._mirror
        while True:
            # A timer, not a wait for an event: resync polls whether replicas are back.
            await asyncio.sleep(self._interval)
            try:
                if pages.unreplicated_pages:
                    await self.once()
                # While pages wait for their resync, the replicas are known to be away (the
                # resync probes them); otherwise a rebuild finds out for itself.
                if (
                    mirror.incomplete
                    and not (fallback.network_down and pages.unreplicated_pages)
                    and mirror.usable()
                ):
                    await self._rebuild.rebuild()
            except Exception:  # the task must outlive any one failure
                log.exception("resync round failed")

    async def once(self) -> int:
        """Copy every mirror-only page to its replicas; returns pages copied this round.

        Stops at the first run the replicas cannot take (still down); the next round
        starts over."""
        pages = self._pages.unreplicated_list()
        if not pages.size:
            return 0
        if self._fallback.network_down:
            log.info("trying to resync %d mirror-only pages", pages.size)
        copied = 0
        for run_first, run_count in runs(pages):
            for seg_first, seg_count in slab_segments(run_first, run_count):
                if not await self._run(seg_first, seg_count):
                    return copied
                copied += seg_count
        if copied and not self._pages.unreplicated_pages:
            log.info("resync done: the replicas hold every page again")
        return copied

    async def _run(self, first: int, count: int) -> bool:
        """Copy one run (inside one slab) from the mirror to the replicas."""
        slab = first // SLAB_PAGES
        # Writes to this slab wait meanwhile: one sent between our mirror read and our
        # replica write would be overwritten by the older data we copy.
        self._ordering.hold(slab)
        try:
            rows = await self._fallback.read_local(first, count, mirror_only=True)
            # Only pages still mirror-only: a write since may have replicated some.
            if self._pages.unreplicated is None:
                return True  # a write since replicated every page
            keep = self._pages.unreplicated_mask(first, count)
            for sub_first, sub_count in runs(np.flatnonzero(keep) + first):
                offset = sub_first - first
                await self._writes.write_pages(sub_first, rows[offset : offset + sub_count])
                self._pages.set_unreplicated(sub_first, sub_count, False)
                await self._mirror.mark_replicated(sub_first, sub_count)
                self._stats.pages_resynced += sub_count
        except (BackendError, MirrorFailure) as exc:
            self._stats.resync_failures += 1
            self._fallback.network_down = True
            log.debug("resync of pages %d+%d failed: %s", first, count, exc)
            return False
        finally:
            self._ordering.release(slab)
        self._fallback.network_down = False
        return True

"""Mirror fallback: where the newest copy of a page is, and the mirror when replicas fail.

With a local mirror (`mirror_link.MirrorLink`), every write is also queued to the mirror
(write-behind, bounded cache). When no replica can store a write (network down), it goes
to the mirror alone, durably, and its pages are marked unreplicated (`PageMap`); such
pages are read from the mirror until the resync task has copied them to their replicas. A
read no replica can serve also falls back to the mirror, if the mirror is known to hold
every write; one that may have missed writes (a session that did not end cleanly, a
timeout) serves only its mirror-only pages until it is rebuilt (`rebuild`).

Without a mirror, this is a thin pass-through to the replicas.
"""

from __future__ import annotations

import errno
import logging

import numpy as np
from remem_common.protocol.pages import PageArray

from remem_client.backend import BackendError
from remem_client.mirror_link import MirrorFailure, MirrorLink
from remem_client.remote.core import Core, Part
from remem_client.remote.pagemap import runs
from remem_client.remote.reads import ReplicaReads
from remem_client.remote.writes import ReplicaWrites

log = logging.getLogger("client.remote")


class MirrorFallback(Part):
    """Loads and stores of whole pages, over the replicas and the mirror."""

    def __init__(
        self, core: Core, *, reads: ReplicaReads, writes: ReplicaWrites, mirror: MirrorLink | None
    ) -> None:
        super().__init__(core)
        self._reads = reads
        self._writes = writes
        self.mirror = mirror
        # The last replica write failed and went to the mirror alone (for the mode metric;
        # the resync task clears it once the replicas take writes again).
        self.network_down = False

    # -- reads -----------------------------------------------------------------------------

    async def load(self, first: int, count: int) -> PageArray:
        """Pages [first, first + count) from wherever the newest copy is: the replicas, or
        the mirror for mirror-only pages and when no replica answers."""
        if self.mirror is not None and self._pages.any_unreplicated(first, count):
            if self.mirror.incomplete:
                return await self._load_mixed(first, count)
            return await self.read_local(first, count)
        try:
            return await self._reads.read_pages(first, count)
        except BackendError as exc:
            if self.mirror is None:
                raise
            log.warning("no replica served pages %d+%d (%s); reading the mirror", first, count, exc)
            return await self.read_local(first, count)

    async def _load_mixed(self, first: int, count: int) -> PageArray:
        """Mirror-only pages from a mirror that may have missed other writes, the rest of
        the run from the replicas."""
        mine = self._pages.unreplicated_mask(first, count)
        rows = await self.read_local(first, count, mirror_only=True)  # a fresh array
        for run_first, run_count in runs(np.flatnonzero(~mine) + first):
            offset = run_first - first
            rows[offset : offset + run_count] = await self._reads.read_pages(run_first, run_count)
        return rows

    async def read_local(self, first: int, count: int, *, mirror_only: bool = False) -> PageArray:
        """Pages from the mirror and its write cache; pages never written read as zeros.
        `mirror_only`: the caller keeps only mirror-only pages (see MirrorLink.read)."""
        assert self.mirror is not None
        try:
            rows = await self.mirror.read(first, count, mirror_only=mirror_only)
        except MirrorFailure as exc:
            raise BackendError(
                errno.EIO, f"pages {first}+{count}: no replica and no mirror: {exc}"
            ) from exc
        written = self._pages.maybe_written(first, count)
        if not written.all():
            rows[~written] = 0  # trimmed on the mirror too, unless that trim was missed
        self._stats.pages_read_mirror += count
        return rows

    # -- changes ---------------------------------------------------------------------------

    async def store(self, first: int, pages: PageArray) -> None:
        """Write pages to every live replica and, behind them, to the mirror; with the
        network down, to the mirror alone (durably) as unreplicated pages."""
        mirror = self.mirror
        if mirror is None:
            await self._writes.write_pages(first, pages)
            return
        count = pages.shape[0]
        if self._ordering.held:
            await self._ordering.wait_unheld(first, count)
        await mirror.write_behind(first, pages)
        try:
            await self._writes.write_pages(first, pages)
        except BackendError as exc:
            try:
                await mirror.write_durable(first, pages)
            except MirrorFailure as mirror_exc:
                raise BackendError(
                    errno.EIO, f"{exc.detail}; and the mirror failed: {mirror_exc}"
                ) from exc
            if not self.network_down:
                log.warning("network down: writing to the mirror alone (%s)", exc.detail)
            self.network_down = True
            self._pages.set_written(first, count, True)
            self._pages.set_unreplicated(first, count, True)
            self._stats.pages_written_mirror_only += count
            return
        if self._pages.any_unreplicated(first, count):
            # The replicas now hold the newest data of these pages.
            self._pages.set_unreplicated(first, count, False)
            mirror.clear_unreplicated(first, count)

    async def free_pages(self, first: int, count: int) -> None:
        """Pages [first, first + count) read as zeros from now on; freed everywhere."""
        written = self._pages.maybe_written(first, count)
        self._pages.set_written(first, count, False)
        if self.mirror is not None:
            self._pages.set_unreplicated(first, count, False)
            self.mirror.trim(first, count)
        if written.any():
            await self._writes.delete_pages(first, count, written)

"""Replica writes: pages sealed once and put on every live replica; deletes (trims).

A write goes to every live replica and push target of each slab it touches at once,
batched with other requests of the same callback (`links`), and completes when all of them
acknowledged. A replica that fails is dropped from use and reported to placement, and the
write completes on the rest: at least one replica, not just a push target, must store it,
else the write fails (`BackendError`: the network is down, and the caller may turn to the
mirror). A replica that did not store it while another did is stale from then on
(`SlabMap.missed_write`).
"""

from __future__ import annotations

import asyncio
import errno
from typing import Any

import numpy as np
from remem_common.protocol.pages import (
    SEAL_BYTES,
    SLAB_PAGES,
    PageArray,
    U32Array,
    checksum_pages,
)

from remem_client.backend import BackendError
from remem_client.remote.core import Core, Part
from remem_client.remote.linkpool import Replica, ReplicaFailure, page_keys, run_keys
from remem_client.remote.pagemap import BoolArray, slab_segments
from remem_client.sealing import PageSealer, SealingError

# One slab's part of a write: (slab, first page, pages, per replica or push target its
# future, None where the write was not sent to it).
_SlabWrite = tuple[int, int, int, list[tuple[Replica, asyncio.Future[Any] | None]]]


class ReplicaWrites(Part):
    """Puts and deletes of pages on the replicas."""

    def __init__(self, core: Core, *, sealer: PageSealer | None) -> None:
        super().__init__(core)
        self._sealer = sealer

    async def write_pages(self, first: int, pages: PageArray) -> None:
        """Put pages [first, first + len(pages)) on the replicas and mark them written;
        `BackendError` if some slab's part reached no replica."""
        count = pages.shape[0]
        if self._sealer is not None:
            # Sealed once, the same ciphertext to every replica (one nonce per page-out).
            try:
                pages, seals = self._sealer.seal(first, pages)
            except (SealingError, OSError) as exc:  # the nonce state could not be advanced
                raise BackendError(errno.EIO, f"cannot seal pages: {exc}") from exc
        else:  # --no-encrypt-pages
            # The replicas' messages must own their bytes, as the sealed ciphertext does: one
            # for a replica that timed out may still wait on its link after this request
            # returns and the NBD layer reuses the payload buffer.
            pages = pages.copy()
            seals = np.zeros((count, SEAL_BYTES), dtype=np.uint8)
        crcs = checksum_pages(pages)
        # Submitted and awaited here, not in helper coroutines: each layer of the chain is
        # resumed again at every wait, and a swap write is one slab segment of one page.
        slabs = self._slabs
        ordering = self._ordering
        waits: list[_SlabWrite] = []
        writing: list[int] = []
        try:
            for seg_first, seg_count in slab_segments(first, count):
                slab = seg_first // SLAB_PAGES
                replicas = slabs.replicas[slab]
                if replicas is None:
                    replicas = await slabs.replicas_of(slab)
                ordering.slab_write_began(slab)
                writing.append(slab)
                waits.append(
                    self._submit_segment(
                        first, pages, crcs, seals, seg_first, seg_count, slab, replicas
                    )
                )
            for slab, seg_first, seg_count, futures in waits:
                replicas = slabs.replicas[slab] or []  # as they were when the wait began
                # Awaited one by one: a future joining them costs more than the writer
                # resuming once more when the replies come in separate loop turns.
                for _, future in futures:
                    if future is not None and not future.done():
                        try:
                            await future
                        except ReplicaFailure:
                            continue  # counted by _check_stored
                self._check_stored(slab, replicas, futures)
                self._pages.set_written(seg_first, seg_count, True)
        finally:
            for slab in writing:
                ordering.slab_write_ended(slab)
        self._stats.pages_written += count

    def _submit_segment(
        self,
        first: int,
        pages: PageArray,
        crcs: U32Array,
        seals: PageArray,
        seg_first: int,
        seg_count: int,
        slab: int,
        replicas: list[Replica],
    ) -> _SlabWrite:
        """Send one slab's part of a write to its replicas and push targets."""
        slabs = self._slabs
        offset = seg_first - first
        end = offset + seg_count
        keys = run_keys(seg_first, seg_count)
        rows, seg_crcs, seg_seals = pages[offset:end], crcs[offset:end], seals[offset:end]
        futures: list[tuple[Replica, asyncio.Future[Any] | None]] = []
        filling = slabs.filling[slab]
        targets = slabs.write_targets(slab, replicas)
        if len(targets) != len(replicas) + len(filling):
            # A replica or push target left out (failing, backing off) misses this write
            # like one that fails it: None stands for its future.
            futures += [(r, None) for r in [*replicas, *filling] if r not in targets]
        last = seg_first + seg_count - 1
        link = self._links.link
        for replica in targets:
            try:
                future = link(replica).submit_put(keys, seg_crcs, rows, seg_seals, seg_first, last)
            except ReplicaFailure as failure:
                slabs.replica_failed(failure, slab)
                futures.append((replica, None))
            else:
                futures.append((replica, future))
        return slab, seg_first, seg_count, futures

    def _check_stored(
        self,
        slab: int,
        replicas: list[Replica],
        futures: list[tuple[Replica, asyncio.Future[Any] | None]],
    ) -> None:
        """Count a slab part's outcome: `BackendError` if no replica stored it, else the
        replicas that did not are stale."""
        slabs = self._slabs
        stored = 0
        missed: list[str] = []
        for replica, future in futures:
            if future is None:
                missed.append(replica.server_id)
                continue
            failure = future.exception()
            if failure is not None:
                if not isinstance(failure, ReplicaFailure):
                    raise failure
                slabs.replica_failed(failure, slab)
                missed.append(replica.server_id)
                continue
            # Only a replica counts: a push target alone is no readable copy (and the
            # push may yet be abandoned and its copy dropped).
            stored += replica in replicas
        if not stored:
            # No replica has it (network down): none is staler than another.
            raise BackendError(errno.EIO, f"no live replica stored slab {slab}'s pages")
        for server_id in missed:
            slabs.missed_write(slab, server_id)

    async def delete_pages(self, first: int, count: int, written: BoolArray) -> None:
        """Free the pages of [first, first + count) where `written` on every live replica
        (the caller has unmarked them already: they read as zeros whatever happens here)."""
        pending: list[tuple[int, asyncio.Future[Any]]] = []
        writing: list[int] = []
        try:
            self._submit_deletes(first, count, written, pending, writing)
            for slab, future in pending:
                try:
                    await future
                except ReplicaFailure as failure:
                    # A replica that missed the delete only holds garbage until the slab is
                    # dropped.
                    self._slabs.replica_failed(failure, slab)
        finally:
            for slab in writing:
                self._ordering.slab_write_ended(slab)

    def _submit_deletes(
        self,
        first: int,
        count: int,
        written: BoolArray,
        pending: list[tuple[int, asyncio.Future[Any]]],
        writing: list[int],
    ) -> None:
        slabs = self._slabs
        for seg_first, seg_count in slab_segments(first, count):
            mask = written[seg_first - first : seg_first - first + seg_count]
            slab = seg_first // SLAB_PAGES
            replicas = slabs.replicas[slab]
            if not mask.any() or replicas is None:
                continue
            self._ordering.slab_write_began(slab)
            writing.append(slab)
            keys = page_keys(seg_first, seg_count, SLAB_PAGES)[mask]
            for replica in slabs.write_targets(slab, replicas):
                try:
                    pending.append(
                        (
                            slab,
                            self._links.link(replica).submit_delete(
                                keys, seg_first, seg_first + seg_count - 1
                            ),
                        )
                    )
                except ReplicaFailure as failure:
                    slabs.replica_failed(failure, slab)
